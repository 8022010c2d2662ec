//! The pieces of SQL-level `PREPARE` and `EXECUTE` the router needs to carry a
//! client's SQL prepared statements itself (docs/routing.md "SQL PREPARE and
//! EXECUTE").
//!
//! The session keeps `PREPARE name (types) AS body` as text and prepares it on
//! a server connection under a name of its own the first time an `EXECUTE`
//! runs there, exactly as the client wrote it, so Postgres gives its
//! parameters the declared types and coerces the arguments as it would on one
//! server. To route an `EXECUTE`, the body is read with each `$n` replaced by
//! its argument: the text routing sees is the statement that runs.

use pg_query::protobuf::node::Node as N;
use pg_query::protobuf::Token;

/// `PREPARE name [(types)] AS body`, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareText {
    /// The statement's name as Postgres folds it.
    pub name: String,
    /// What stands between the name and `AS`: the parameter types with their
    /// parentheses, or nothing.
    pub types: String,
    pub body: String,
    /// How many arguments an EXECUTE must give: the declared types, or more
    /// when the body uses a higher `$n` (Postgres infers its type).
    pub params: usize,
}

/// `EXECUTE name [(args)]`, taken apart: each argument's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecuteText {
    pub name: String,
    pub args: Vec<String>,
}

fn top_node(sql: &str) -> Result<N, String> {
    let parsed = pg_query::parse(sql, 0).map_err(|e| e.to_string())?;
    let mut stmts = parsed.protobuf.stmts.into_iter();
    let (Some(raw), None) = (stmts.next(), stmts.next()) else {
        return Err("expected one statement".into());
    };
    raw.stmt.and_then(|s| s.node).ok_or_else(|| "empty statement".to_string())
}

fn tokens(sql: &str) -> Result<Vec<pg_query::protobuf::ScanToken>, String> {
    Ok(pg_query::scan(sql).map_err(|e| e.to_string())?.tokens)
}

fn is(t: &pg_query::protobuf::ScanToken, token: Token) -> bool {
    t.token == token as i32
}

/// Reads `PREPARE name [(types)] AS body`; an error when `sql` is not one.
pub fn parse_prepare(sql: &str) -> Result<PrepareText, String> {
    let N::PrepareStmt(p) = top_node(sql)? else {
        return Err("not a PREPARE statement".into());
    };
    let tokens = tokens(sql)?;
    // PREPARE, the name, then (types) up to the first AS outside parentheses.
    let name_end = tokens.get(1).map(|t| t.end as usize).ok_or("no name")?;
    let mut depth = 0i32;
    let as_token = tokens
        .iter()
        .skip(2)
        .find(|t| {
            if is(t, Token::Ascii40) {
                depth += 1;
            } else if is(t, Token::Ascii41) {
                depth -= 1;
            }
            depth == 0 && is(t, Token::As)
        })
        .ok_or("no AS")?;
    let types = sql[name_end..as_token.start as usize].trim().to_string();
    let body = sql[as_token.end as usize..].trim().trim_end_matches(';').trim_end().to_string();
    let params = max_param(&body)?.max(p.argtypes.len());
    Ok(PrepareText { name: p.name, types, body, params })
}

/// Reads `EXECUTE name [(args)]` standing alone (not under EXPLAIN or CREATE
/// TABLE AS); an error otherwise.
pub fn parse_execute(sql: &str) -> Result<ExecuteText, String> {
    let N::ExecuteStmt(e) = top_node(sql)? else {
        return Err("not an EXECUTE statement".into());
    };
    let tokens = tokens(sql)?;
    let mut args = Vec::with_capacity(e.params.len());
    // After EXECUTE and the name: ( arg, arg … ), split at commas outside
    // nested parentheses and brackets.
    let mut depth = 0i32;
    let mut start = None;
    for t in tokens.iter().skip(2) {
        let (open, close, comma) = (
            is(t, Token::Ascii40) || is(t, Token::Ascii91),
            is(t, Token::Ascii41) || is(t, Token::Ascii93),
            is(t, Token::Ascii44),
        );
        if open {
            depth += 1;
            if depth == 1 {
                start = Some(t.end as usize);
                continue;
            }
        }
        if (close || comma) && depth == 1 {
            let from = start.ok_or("an argument with no start")?;
            let arg = sql[from..t.start as usize].trim();
            if !arg.is_empty() || comma || !args.is_empty() {
                args.push(arg.to_string());
            }
            start = Some(t.end as usize);
        }
        if close {
            depth -= 1;
            if depth == 0 {
                break;
            }
        }
    }
    if args.len() != e.params.len() {
        return Err(format!("read {} arguments where the parser saw {}", args.len(), e.params.len()));
    }
    Ok(ExecuteText { name: e.name, args })
}

/// The highest `$n` in `body` (0 when there is none), by the scanner, which
/// sees every one wherever it stands.
pub fn max_param(body: &str) -> Result<usize, String> {
    let mut max = 0;
    for t in tokens(body)?.iter().filter(|t| is(t, Token::Param)) {
        let text = body.get(t.start as usize..t.end as usize).unwrap_or_default();
        max = max.max(text.trim_start_matches('$').parse::<usize>().map_err(|e| e.to_string())?);
    }
    Ok(max)
}

/// The body with each `$n` replaced by `(arg n)`: the statement an EXECUTE
/// runs, for routing to read.
pub fn substitute(body: &str, args: &[String]) -> Result<String, String> {
    let mut out = String::with_capacity(body.len() + args.iter().map(|a| a.len() + 2).sum::<usize>());
    let mut copied = 0;
    for t in tokens(body)?.iter().filter(|t| is(t, Token::Param)) {
        let (start, end) = (t.start as usize, t.end as usize);
        let n: usize = body[start..end].trim_start_matches('$').parse().map_err(|e| format!("{e}"))?;
        let arg = n.checked_sub(1).and_then(|i| args.get(i)).ok_or_else(|| format!("no argument for ${n}"))?;
        out.push_str(&body[copied..start]);
        out.push('(');
        out.push_str(arg);
        out.push(')');
        copied = end;
    }
    out.push_str(&body[copied..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prepare_comes_apart_into_name_types_and_body() {
        let p =
            parse_prepare("PREPARE Ins (int, numeric(10,2)) AS INSERT INTO t VALUES ($1, $2) RETURNING $3;").unwrap();
        assert_eq!(p.name, "ins");
        assert_eq!(p.types, "(int, numeric(10,2))");
        assert_eq!(p.body, "INSERT INTO t VALUES ($1, $2) RETURNING $3");
        assert_eq!(p.params, 3, "an undeclared $3 is inferred");
        let p = parse_prepare("prepare \"Q\" as select 'as', x as y from t where a = $1").unwrap();
        assert_eq!((p.name.as_str(), p.types.as_str()), ("Q", ""));
        assert_eq!(p.body, "select 'as', x as y from t where a = $1");
        assert_eq!(p.params, 1);
        assert!(parse_prepare("SELECT 1").is_err());
    }

    #[test]
    fn an_execute_comes_apart_into_its_arguments() {
        let e = parse_execute("EXECUTE q(1, 'a,b', f(2, 3), ARRAY[4, 5], (6))").unwrap();
        assert_eq!(e.name, "q");
        assert_eq!(e.args, ["1", "'a,b'", "f(2, 3)", "ARRAY[4, 5]", "(6)"]);
        assert_eq!(parse_execute("execute q").unwrap().args, Vec::<String>::new());
        assert_eq!(parse_execute("EXECUTE q ( 'x' ) ;").unwrap().args, ["'x'"]);
        assert!(parse_execute("EXPLAIN EXECUTE q(1)").is_err());
    }

    #[test]
    fn routing_reads_the_body_with_its_arguments_in_place() {
        let args = vec!["42".to_string(), "'it''s'".to_string()];
        assert_eq!(
            substitute("SELECT $2, '$1' FROM t WHERE tenant_id = $1", &args).unwrap(),
            "SELECT ('it''s'), '$1' FROM t WHERE tenant_id = (42)"
        );
        assert!(substitute("SELECT $3", &args).is_err());
    }
}
