# Runs a Logstash ruby filter file as Logstash's ruby filter does (it evaluates the file in
# an object of its own, calls register(params) once, then filter(event) per event) over
# events read as JSON lines from standard input, and writes each event the filter returns
# as one JSON line. Event is a stand-in for the part of LogStash::Event a filter uses: get
# and set of field references such as "[ipfix][flowType]"; get returns a copy, as
# Logstash's does.
#
#   ruby filter_harness.rb FILTER.rb < events.jsonl > filtered.jsonl

require "json"

class Event
  def initialize(data)
    @data = data
  end

  def get(reference)
    value = path(reference).reduce(@data) { |node, key| node.is_a?(Hash) ? node[key] : nil }
    Marshal.load(Marshal.dump(value))
  end

  def set(reference, value)
    *parents, last = path(reference)
    node = parents.reduce(@data) { |hash, key| hash[key] ||= {} }
    node[last] = value
  end

  def to_hash
    @data
  end

  private

  def path(reference)
    keys = reference.scan(/\[([^\]]+)\]/).flatten
    keys.empty? ? [reference] : keys
  end
end

script = ARGV.fetch(0)
context = Object.new
context.instance_eval(File.read(script), script, 1)
context.register({})
STDIN.each_line do |line|
  results = context.filter(Event.new(JSON.parse(line)))
  raise "filter returned #{results.inspect}, not an Array" unless results.is_a?(Array)
  results.each { |event| puts JSON.generate(event.to_hash) }
end
