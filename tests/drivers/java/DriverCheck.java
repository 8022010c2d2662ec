// pgjdbc through the router: server-prepared statements from the first use
// (prepareThreshold=1) with binary transfer, transactions, executeBatch in a
// transaction and in autocommit, COPY (CopyManager) and SQLSTATEs.
// Usage: java -cp .:postgresql.jar DriverCheck ROUTER_URL TENANT_A TENANT_B

import java.io.StringReader;
import java.io.StringWriter;
import java.math.BigDecimal;
import java.net.URI;
import java.sql.*;
import java.time.OffsetDateTime;
import java.util.*;
import org.postgresql.PGConnection;
import org.postgresql.copy.CopyManager;

public class DriverCheck {
  static final String COLUMNS = "tenant_id, id, note, amount, flag, data, ts, uid, score, doc";
  static final String INSERT =
      "INSERT INTO items (" + COLUMNS + ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?::jsonb)";
  static final String SELECT_ONE =
      "SELECT " + COLUMNS + " FROM items WHERE tenant_id = ? AND id = ?";
  static final OffsetDateTime TS = OffsetDateTime.parse("2024-01-02T03:04:05.123456Z");

  static void fail(String msg) {
    System.err.println("FAILED: " + msg);
    System.exit(1);
  }

  static void check(boolean cond, String msg) {
    if (!cond) fail(msg);
  }

  static String note(long t, int i) {
    return "t" + t + " row " + i + ": é ' \" \\ ✓";
  }

  static UUID uid(long t, int i) {
    return UUID.fromString(String.format("00000000-0000-4000-8000-%06d%06d", t, i));
  }

  static byte[] data(int i) {
    return new byte[] {0, 1, (byte) 255, (byte) (i % 256)};
  }

  static void bind(PreparedStatement ps, long t, int i) throws SQLException {
    ps.setLong(1, t);
    ps.setInt(2, i);
    ps.setString(3, note(t, i));
    ps.setBigDecimal(4, new BigDecimal(i + ".25"));
    ps.setBoolean(5, i % 2 == 0);
    ps.setBytes(6, data(i));
    ps.setObject(7, TS);
    ps.setObject(8, uid(t, i));
    ps.setDouble(9, i + 0.5);
    ps.setString(10, "{\"t\": " + t + ", \"i\": " + i + "}");
  }

  static void insert(PreparedStatement ps, long t, int i) throws SQLException {
    bind(ps, t, i);
    check(ps.executeUpdate() == 1, "insert (" + t + ", " + i + ")");
  }

  static void checkRow(PreparedStatement select, long t, int i, String what) throws SQLException {
    select.setLong(1, t);
    select.setInt(2, i);
    try (ResultSet rs = select.executeQuery()) {
      check(rs.next(), what + ": row (" + t + ", " + i + ") missing");
      String where = what + ": row (" + t + ", " + i + ") ";
      check(rs.getLong(1) == t && rs.getInt(2) == i, where + "key");
      check(rs.getString(3).equals(note(t, i)), where + "note " + rs.getString(3));
      check(rs.getBigDecimal(4).equals(new BigDecimal(i + ".25")), where + "amount " + rs.getBigDecimal(4));
      check(rs.getBoolean(5) == (i % 2 == 0), where + "flag");
      check(Arrays.equals(rs.getBytes(6), data(i)), where + "data " + Arrays.toString(rs.getBytes(6)));
      check(rs.getObject(7, OffsetDateTime.class).isEqual(TS), where + "ts " + rs.getObject(7, OffsetDateTime.class));
      check(rs.getObject(8, UUID.class).equals(uid(t, i)), where + "uid " + rs.getObject(8));
      check(rs.getDouble(9) == i + 0.5, where + "score " + rs.getDouble(9));
      check(rs.getString(10).equals("{\"i\": " + i + ", \"t\": " + t + "}"), where + "doc " + rs.getString(10));
      check(!rs.next(), where + "twice");
    }
  }

  interface Step {
    void run() throws Exception;
  }

  static SQLException expectSqlstate(String code, Step step, String what) throws Exception {
    try {
      step.run();
    } catch (SQLException e) {
      SQLException first = e;
      if (e instanceof BatchUpdateException && e.getNextException() != null) first = e.getNextException();
      String got = e.getSQLState() != null ? e.getSQLState() : first.getSQLState();
      check(code.equals(got), what + ": SQLSTATE " + got + " (" + e.getMessage() + "), expected " + code);
      return e;
    }
    fail(what + ": no error, expected SQLSTATE " + code);
    return null;
  }

  static long count(Connection c, String sql) throws SQLException {
    try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery(sql)) {
      rs.next();
      return rs.getLong(1);
    }
  }

  static void batch(Connection c, long[][] rows) throws SQLException {
    try (PreparedStatement ps = c.prepareStatement(INSERT)) {
      for (long[] r : rows) {
        bind(ps, r[0], (int) r[1]);
        ps.addBatch();
      }
      int[] counts = ps.executeBatch();
      check(counts.length == rows.length, "executeBatch counts " + Arrays.toString(counts));
    }
  }

  public static void main(String[] args) throws Exception {
    if (args.length != 3) fail("usage: DriverCheck ROUTER_URL TENANT_A TENANT_B");
    URI u = new URI(args[0]);
    long a = Long.parseLong(args[1]), b = Long.parseLong(args[2]);
    // The URL's user, password and TLS parameters (sslmode, sslrootcert) as
    // pgjdbc takes them.
    String[] user = u.getUserInfo().split(":", 2);
    String jdbc = "jdbc:postgresql://" + u.getHost() + ":" + u.getPort() + u.getPath()
        + "?user=" + user[0] + (user.length > 1 ? "&password=" + user[1] : "")
        + "&prepareThreshold=1&binaryTransfer=true"
        + (u.getRawQuery() != null ? "&" + u.getRawQuery() : "&sslmode=disable");
    try (Connection c = DriverManager.getConnection(jdbc)) {
      DatabaseMetaData md = c.getMetaData();
      System.out.println("driver: pgjdbc " + md.getDriverVersion() + " (Java " + System.getProperty("java.version")
          + "), server " + md.getDatabaseProductVersion());
      check(count(c, "SELECT 1") == 1, "SELECT 1");
      PreparedStatement ins = c.prepareStatement(INSERT);
      PreparedStatement sel = c.prepareStatement(SELECT_ONE);

      // Server-prepared from the first execution, binary results.
      insert(ins, a, 1);
      insert(ins, b, 1);
      for (long t : new long[] {a, b}) {
        for (int k = 0; k < 3; k++) checkRow(sel, t, 1, "prepared select");
      }

      // Rolled back: nothing stays. Committed: both shards.
      c.setAutoCommit(false);
      insert(ins, a, 2);
      insert(ins, b, 2);
      c.rollback();
      insert(ins, a, 3);
      insert(ins, b, 3);
      c.commit();
      // A read of every shard as a transaction's first statement (pgjdbc sends
      // its BEGIN in the same pipeline), then after the block's own write.
      check(count(c, "SELECT count(*) FROM items WHERE id = 2") == 0, "a cross-shard read opening a transaction");
      insert(ins, a, 2);
      check(count(c, "SELECT count(*) FROM items WHERE id = 2") == 1, "a cross-shard read sees the block's write");
      c.rollback();
      c.setAutoCommit(true);
      check(count(c, "SELECT count(*) FROM items WHERE id = 2") == 0, "rolled-back rows are visible");
      c.setAutoCommit(false);

      // executeBatch in a transaction: one pipeline, both shards, one commit.
      batch(c, new long[][] {{a, 10}, {b, 10}, {a, 11}, {b, 11}});
      c.commit();
      expectSqlstate("23505", () -> batch(c, new long[][] {{a, 20}, {b, 20}, {b, 21}, {a, 1}}), "a batch with a duplicate row");
      c.rollback();
      // executeBatch in autocommit: one implicit transaction across both shards.
      c.setAutoCommit(true);
      batch(c, new long[][] {{a, 12}, {b, 12}});
      expectSqlstate("23505", () -> batch(c, new long[][] {{a, 22}, {b, 22}, {b, 1}}), "an autocommit batch with a duplicate row");

      // reWriteBatchedInserts turns the batch into one multi-row INSERT with
      // parameters: for tenants on two shards, each shard gets its rows, all
      // committed or none.
      try (Connection rw = DriverManager.getConnection(jdbc + "&reWriteBatchedInserts=true")) {
        batch(rw, new long[][] {{a, 23}, {b, 23}});
        check(count(rw, "SELECT count(*) FROM items WHERE id = 23") == 2, "a rewritten batch across shards wrote both rows");
        expectSqlstate("23505", () -> batch(rw, new long[][] {{a, 24}, {b, 1}}), "a rewritten batch with a duplicate row");
        check(count(rw, "SELECT count(*) FROM items WHERE id = 24") == 0, "a failed rewritten batch left a row");
        // Six rows become a 4-row and a 2-row INSERT, both executed before
        // one Sync: one transaction across shards.
        batch(rw, new long[][] {{a, 25}, {b, 25}, {a, 26}, {b, 26}, {a, 28}, {b, 28}});
        check(count(rw, "SELECT count(*) FROM items WHERE id IN (25, 26, 28)") == 6, "a rewritten 6-row batch wrote every row");
        expectSqlstate("23505", () -> batch(rw, new long[][] {{a, 27}, {b, 27}, {a, 1}}), "a rewritten 3-row batch with a duplicate row");
        check(count(rw, "SELECT count(*) FROM items WHERE id = 27") == 0, "a failed rewritten 3-row batch left a row");
      }

      // Statement.addBatch with a text per row: one pipeline that parses the
      // unnamed statement again before each execution; each runs its own text
      // (three different changes, then undone the same way).
      String[] rows = {"tenant_id = " + a + " AND id = 25", "tenant_id = " + b + " AND id = 25", "tenant_id = " + a + " AND id = 26"};
      long[] before = new long[rows.length];
      for (int i = 0; i < rows.length; i++) before[i] = count(c, "SELECT (amount * 100)::bigint FROM items WHERE " + rows[i]);
      for (int sign : new int[] {1, -1}) {
        try (Statement s = c.createStatement()) {
          for (int i = 0; i < rows.length; i++) s.addBatch("UPDATE items SET amount = amount + " + sign * (i + 1) + " WHERE " + rows[i]);
          int[] n = s.executeBatch();
          check(Arrays.equals(n, new int[] {1, 1, 1}), "a statement batch counted " + Arrays.toString(n));
        }
        for (int i = 0; i < rows.length; i++) {
          long now = count(c, "SELECT (amount * 100)::bigint FROM items WHERE " + rows[i]);
          check(now == before[i] + (sign == 1 ? 100L * (i + 1) : 0), "a statement batch ran text " + i + " on its own row: " + now);
        }
      }

      // COPY FROM STDIN (split by tenant) and COPY TO STDOUT.
      CopyManager copy = c.unwrap(PGConnection.class).getCopyAPI();
      StringBuilder lines = new StringBuilder();
      for (int i : new int[] {30, 31}) {
        for (long t : new long[] {a, b}) {
          lines.append(t).append('\t').append(i).append('\t').append(note(t, i).replace("\\", "\\\\")).append('\t')
              .append(i).append(".25\t").append(i % 2 == 0 ? "t" : "f").append("\t\\\\x")
              .append(String.format("0001ff%02x", i % 256)).append("\t2024-01-02 03:04:05.123456+00\t")
              .append(uid(t, i)).append('\t').append(i + 0.5).append("\t{\"t\": ").append(t).append(", \"i\": ")
              .append(i).append("}\n");
        }
      }
      long copied = copy.copyIn("COPY items (" + COLUMNS + ") FROM STDIN", new StringReader(lines.toString()));
      check(copied == 4, "COPY counted " + copied);
      StringWriter out = new StringWriter();
      copy.copyOut("COPY (SELECT id FROM items WHERE tenant_id = " + a + " ORDER BY id) TO STDOUT", out);
      check(out.toString().equals("1\n3\n10\n11\n12\n23\n25\n26\n28\n30\n31\n"), "COPY TO STDOUT gave " + out);

      // Errors with their SQLSTATE; the connection goes on.
      expectSqlstate("23505", () -> insert(ins, b, 1), "duplicate key");
      expectSqlstate("0A000", () -> {
        try (PreparedStatement ps = c.prepareStatement("UPDATE items SET tenant_id = ? WHERE tenant_id = ?")) {
          ps.setLong(1, b);
          ps.setLong(2, a);
          ps.executeUpdate();
        }
      }, "moving a row");
      expectSqlstate("22P02", () -> count(c, "SELECT count(*) FROM items WHERE tenant_id = 'x'"), "bad key");

      List<String> got = new ArrayList<>();
      try (Statement s = c.createStatement();
           ResultSet rs = s.executeQuery("SELECT tenant_id, id FROM items ORDER BY tenant_id, id")) {
        while (rs.next()) got.add(rs.getLong(1) + ":" + rs.getInt(2));
      }
      List<String> want = new ArrayList<>();
      for (long t : new long[] {Math.min(a, b), Math.max(a, b)}) {
        for (int i : new int[] {1, 3, 10, 11, 12, 23, 25, 26, 28, 30, 31}) want.add(t + ":" + i);
      }
      check(got.equals(want), "rows through the router: " + got + ", expected " + want);
      for (long t : new long[] {a, b}) {
        for (int i : new int[] {3, 10, 12, 30}) checkRow(sel, t, i, "row " + i);
      }
    }
    System.out.println("ok");
  }
}
