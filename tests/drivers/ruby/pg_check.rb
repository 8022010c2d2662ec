# Ruby's pg through the router: prepared statements (exec_prepared), binary
# parameters and results, transactions, a pipelined batch (libpq pipeline
# mode) in a transaction, COPY (copy_data) and SQLSTATEs.
# Usage: ruby pg_check.rb ROUTER_URL TENANT_A TENANT_B
require 'json'

def fail!(msg)
  warn "FAILED: #{msg}"
  exit 1
end

def check(cond, msg)
  fail!(msg) unless cond
end

begin
  require 'pg'
rescue LoadError => e
  fail!("the Ruby driver pg is not installed (#{e.message}): run scripts/install-deps.sh")
end

fail!("usage: #{$PROGRAM_NAME} ROUTER_URL TENANT_A TENANT_B") unless ARGV.size == 3
url = ARGV[0]
a = Integer(ARGV[1])
b = Integer(ARGV[2])
puts "driver: pg #{PG::VERSION} (Ruby #{RUBY_VERSION}, libpq #{PG.library_version})"

COLUMNS = 'tenant_id, id, note, amount, flag, data, ts, uid, score, doc'
INSERT = "INSERT INTO items (#{COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
SELECT_ONE = "SELECT #{COLUMNS} FROM items WHERE tenant_id = $1 AND id = $2"
TS = '2024-01-02 03:04:05.123456+00'

def note(t, i) = "t#{t} row #{i}: é ' \" \\ ✓"
def uid(t, i) = format('00000000-0000-4000-8000-%06d%06d', t, i)
def data(i) = [0, 1, 255, i % 256].pack('C*')

# The row's parameters: bytea in binary, the rest as text.
def params(t, i)
  [t, i, note(t, i), "#{i}.25", i.even? ? 't' : 'f', { value: data(i), format: 1 }, TS, uid(t, i), (i + 0.5).to_s,
   JSON.generate({ t: t, i: i })]
end

def check_row(conn, t, i, what, format: 0)
  r = conn.exec_prepared('select_item', [t, i], format)
  check(r.ntuples == 1, "#{what}: row (#{t}, #{i}) missing")
  row = r.values.first
  if format == 1
    # Binary results: int8, int4 as big-endian integers, the rest as sent by the server.
    check(row[0].unpack1('q>') == t && row[1].unpack1('l>') == i, "#{what}: binary key #{row[0].inspect}")
    check(row[2].force_encoding('UTF-8') == note(t, i), "#{what}: binary note")
    check(row[5] == data(i), "#{what}: binary data #{row[5].inspect}")
    check(row[4] == (i.even? ? "\x01" : "\x00"), "#{what}: binary flag")
    return
  end
  got = [row[0].to_i, row[1].to_i, row[2], row[3], row[4], conn.unescape_bytea(row[5]), row[7], row[8].to_f,
         JSON.parse(row[9])]
  want = [t, i, note(t, i), "#{i}.25", i.even? ? 't' : 'f', data(i), uid(t, i), i + 0.5, { 't' => t, 'i' => i }]
  check(got == want, "#{what}: row (#{t}, #{i}) came back as #{got.inspect}, expected #{want.inspect}")
  ts = conn.exec_params("SELECT $1::timestamptz = '#{TS}'", [row[6]]).getvalue(0, 0)
  check(ts == 't', "#{what}: ts #{row[6]}")
end

def expect_sqlstate(code, what)
  yield
  fail!("#{what}: no error, expected SQLSTATE #{code}")
rescue PG::Error => e
  got = e.result&.error_field(PG::Result::PG_DIAG_SQLSTATE)
  check(got == code, "#{what}: SQLSTATE #{got} (#{e.message.strip}), expected #{code}")
  e
end

conn = PG.connect(url)
check(conn.exec('SELECT 1').getvalue(0, 0) == '1', 'SELECT 1')
conn.prepare('insert_item', INSERT)
conn.prepare('select_item', SELECT_ONE)
[a, b].each { |t| conn.exec_prepared('insert_item', params(t, 1)) }
[a, b].each do |t|
  3.times { check_row(conn, t, 1, 'prepared select') }
  check_row(conn, t, 1, 'binary results', format: 1)
end

# Rolled back: nothing stays. Committed: both shards.
class Undo < StandardError; end
begin
  conn.transaction do |c|
    c.exec_prepared('insert_item', params(a, 2))
    c.exec_prepared('insert_item', params(b, 2))
    raise Undo
  end
rescue Undo
  check(conn.transaction_status == PG::PQTRANS_IDLE, 'rolled back')
end
conn.transaction do |c|
  c.exec_prepared('insert_item', params(a, 3))
  c.exec_prepared('insert_item', params(b, 3))
end
check(conn.exec('SELECT count(*) FROM items WHERE id = 2').getvalue(0, 0) == '0', 'rolled-back rows are visible')

# A batch in libpq's pipeline mode, in a transaction: one round trip, both shards.
def pipelined(conn, rows)
  conn.exec('BEGIN')
  conn.enter_pipeline_mode
  rows.each { |t, i| conn.send_query_prepared('insert_item', params(t, i)) }
  conn.pipeline_sync
  error = nil
  rows.size.times do
    r = conn.get_result
    begin
      r.check
    rescue PG::Error => e
      error ||= e
    end
    conn.get_result # the nil after each statement's result
  end
  r = conn.get_result
  check(r.result_status == PG::PGRES_PIPELINE_SYNC, "pipeline sync: #{r.res_status(r.result_status)}")
  conn.exit_pipeline_mode
  if error
    conn.exec('ROLLBACK')
    raise error
  end
  conn.exec('COMMIT')
end
pipelined(conn, [[a, 10], [b, 10], [a, 11], [b, 11]])
expect_sqlstate('23505', 'a pipelined batch with a duplicate row') do
  pipelined(conn, [[a, 20], [b, 20], [b, 21], [a, 1]])
end

# COPY FROM STDIN (split by tenant) and COPY TO STDOUT.
conn.copy_data("COPY items (#{COLUMNS}) FROM STDIN") do
  [30, 31].each do |i|
    [a, b].each do |t|
      line = [t, i, note(t, i).gsub('\\', '\\\\\\\\'), "#{i}.25", i.even? ? 't' : 'f',
              "\\\\x#{data(i).unpack1('H*')}", TS, uid(t, i), (i + 0.5).to_s, JSON.generate({ t: t, i: i })]
      conn.put_copy_data(line.join("\t") + "\n")
    end
  end
end
copied = []
conn.copy_data("COPY (SELECT id FROM items WHERE tenant_id = #{b} ORDER BY id) TO STDOUT") do
  while (line = conn.get_copy_data)
    copied << line.strip
  end
end
check(copied == %w[1 3 10 11 30 31], "COPY TO STDOUT gave #{copied}")

# Errors with their SQLSTATE; the connection goes on.
e = expect_sqlstate('23505', 'duplicate key') { conn.exec_prepared('insert_item', params(a, 1)) }
check(e.is_a?(PG::UniqueViolation), "23505 raised as #{e.class}")
e = expect_sqlstate('0A000', 'moving a row') do
  conn.exec_params('UPDATE items SET tenant_id = $1 WHERE tenant_id = $2', [b, a])
end
check(e.is_a?(PG::FeatureNotSupported), "0A000 raised as #{e.class}")
expect_sqlstate('22P02', 'bad key') { conn.exec("SELECT * FROM items WHERE tenant_id = 'x'") }

got = conn.exec('SELECT tenant_id, id FROM items ORDER BY tenant_id, id').values.map { |t, i| [t.to_i, i.to_i] }
want = [a, b].sort.flat_map { |t| [1, 3, 10, 11, 30, 31].map { |i| [t, i] } }
check(got == want, "rows through the router: #{got}, expected #{want}")
[a, b].each { |t| [3, 10, 11, 30].each { |i| check_row(conn, t, i, "row #{i}") } }
conn.close
puts 'ok'
