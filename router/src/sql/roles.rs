//! Statements about roles (`CREATE ROLE`, `ALTER ROLE`, `DROP ROLE`, `GRANT
//! role TO role`). Roles belong to each shard's server, not to a database, so
//! the router runs these on every shard like DDL, and two things follow:
//!
//! - a password given in plain is hashed once, by the router, into a
//!   SCRAM-SHA-256 verifier that every shard then stores: each shard hashing
//!   it itself would pick its own salt, and a client's SCRAM login could not
//!   pass through to the shards (docs/security.md);
//! - the router forgets the passwords it looked up (`crate::roles`).

use pg_query::protobuf::node::Node as N;
use pg_query::protobuf::Token;

/// Whether `sql` creates, changes or drops a role, or grants one.
pub fn changes_roles(sql: &str) -> bool {
    let Ok(parsed) = pg_query::parse(sql, 0) else { return false };
    parsed.protobuf.stmts.iter().filter_map(|s| s.stmt.as_ref().and_then(|n| n.node.as_ref())).any(|n| {
        matches!(
            n,
            N::CreateRoleStmt(_)
                | N::AlterRoleStmt(_)
                | N::DropRoleStmt(_)
                | N::AlterRoleSetStmt(_)
                | N::GrantRoleStmt(_)
        ) || matches!(n, N::RenameStmt(r) if r.rename_type == pg_query::protobuf::ObjectType::ObjectRole as i32)
    })
}

/// `sql` with every password that `CREATE ROLE`/`ALTER ROLE` give in plain
/// replaced by its SCRAM-SHA-256 verifier (as Postgres would store it with
/// `password_encryption = scram-sha-256`). None when there is none to
/// replace: no role statement, `PASSWORD NULL`, or a password given as a
/// verifier or an md5 hash already (what psql's `\password` sends).
pub fn hash_passwords(sql: &str) -> Option<String> {
    let parsed = pg_query::parse(sql, 0).ok()?;
    // The passwords in the order they stand (None: NULL).
    let mut passwords: Vec<Option<String>> = Vec::new();
    for stmt in parsed.protobuf.stmts.iter().filter_map(|s| s.stmt.as_ref().and_then(|n| n.node.as_ref())) {
        let options = match stmt {
            N::CreateRoleStmt(c) => &c.options,
            N::AlterRoleStmt(a) => &a.options,
            _ => continue,
        };
        for o in options {
            if let Some(N::DefElem(d)) = &o.node {
                if d.defname == "password" {
                    passwords.push(d.arg.as_ref().and_then(|a| match &a.node {
                        Some(N::String(s)) => Some(s.sval.clone()),
                        _ => None,
                    }));
                }
            }
        }
    }
    if !passwords.iter().flatten().any(|p| crate::auth::is_plain_password(p)) {
        return None;
    }
    // Where each password's literal stands: the token after PASSWORD.
    let tokens = pg_query::scan(sql).ok()?.tokens;
    let literals: Vec<(usize, usize, bool)> = tokens
        .windows(2)
        .filter(|w| w[0].token == Token::Password as i32)
        .filter(|w| w[1].token == Token::Sconst as i32 || w[1].token == Token::NullP as i32)
        .map(|w| (w[1].start as usize, w[1].end as usize, w[1].token == Token::Sconst as i32))
        .collect();
    if literals.len() != passwords.len() {
        // Not the shape expected: leave the text alone rather than guess.
        return None;
    }
    let mut out = sql.to_string();
    for ((start, end, is_string), password) in literals.into_iter().zip(passwords).rev() {
        let (true, Some(p)) = (is_string, password) else { continue };
        if crate::auth::is_plain_password(&p) {
            let verifier = postgres_protocol::password::scram_sha_256(p.as_bytes());
            out.replace_range(start..end, &super::quote::literal(&verifier));
        }
    }
    Some(out)
}

/// Whether `sql` has the word "password" in any case: the cheap test before
/// [`hash_passwords`] parses it (every simple query takes it).
pub fn mentions_password(sql: &str) -> bool {
    const WORD: &[u8] = b"password";
    let b = sql.as_bytes();
    // Every query string is looked through: jump from one `p` to the next.
    memchr::memchr2_iter(b'p', b'P', b).any(|i| b.get(i..i + WORD.len()).is_some_and(|w| w.eq_ignore_ascii_case(WORD)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_word_is_found_in_any_case_and_place() {
        for sql in ["password", "ALTER ROLE a PASSWORD 'x'", "alter role a PassWord 'x'", "select 1 -- passworD"] {
            assert!(mentions_password(sql), "{sql}");
        }
        for sql in ["", "p", "select passwor", "SELECT pass FROM word", "ALTER ROLE a LOGIN"] {
            assert!(!mentions_password(sql), "{sql}");
        }
    }

    #[test]
    fn plain_passwords_become_one_verifier() {
        let sql = "CREATE ROLE alice LOGIN PASSWORD 'it''s secret'; ALTER USER bob WITH ENCRYPTED PASSWORD E'x\\'y' VALID UNTIL 'infinity'";
        let out = hash_passwords(sql).expect("rewritten");
        assert!(!out.contains("secret") && !out.contains("x\\'y"), "{out}");
        assert_eq!(out.matches("'SCRAM-SHA-256$4096:").count(), 2, "{out}");
        assert!(out.contains("VALID UNTIL 'infinity'"), "{out}");
        let parsed = pg_query::parse(&out, 0).expect("still SQL");
        assert_eq!(parsed.protobuf.stmts.len(), 2);
        // The verifier checks the password as given (quotes unescaped).
        let v = out.split('\'').find(|p| p.starts_with("SCRAM-SHA-256$")).unwrap();
        let secret = crate::auth::ScramSecret::parse(v).unwrap();
        assert!(secret.matches_password("it's secret") && !secret.matches_password("it''s secret"));
    }

    #[test]
    fn hashed_null_and_other_statements_stay() {
        for sql in [
            "CREATE ROLE a PASSWORD NULL",
            "ALTER ROLE a PASSWORD 'md5e8a48653851e28c69d0506508fb27fc5'",
            "ALTER ROLE a PASSWORD 'SCRAM-SHA-256$4096:c2FsdA==$a2V5:a2V5'",
            "SELECT 'PASSWORD' AS password",
            "CREATE TABLE t (password text)",
        ] {
            assert_eq!(hash_passwords(sql), None, "{sql}");
        }
        // NULL beside a plain one: the plain one is replaced, NULL stays.
        let out = hash_passwords("CREATE ROLE a PASSWORD NULL; CREATE ROLE b PASSWORD 'pw'").unwrap();
        assert!(out.contains("PASSWORD NULL") && !out.contains("'pw'"), "{out}");
    }

    #[test]
    fn role_statements_are_recognised() {
        for sql in [
            "CREATE ROLE a",
            "ALTER ROLE a SET work_mem = '1MB'",
            "DROP USER a",
            "GRANT a TO b",
            "ALTER ROLE a RENAME TO b",
        ] {
            assert!(changes_roles(sql), "{sql}");
        }
        for sql in ["GRANT SELECT ON t TO a", "SELECT 1", "ALTER TABLE t RENAME TO u"] {
            assert!(!changes_roles(sql), "{sql}");
        }
    }
}
