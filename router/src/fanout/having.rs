//! HAVING across shards: the condition on the combined groups, planned from
//! its parse tree and evaluated by the router.
//!
//! A group's partial aggregates on one shard say nothing of its totals, so the
//! shards return every group without HAVING; the router combines the groups,
//! then keeps those whose condition is true. The aggregates the condition reads
//! are columns of the shards' answer, hidden from the client when the select
//! list lacks them. Only what the router evaluates exactly as Postgres does is
//! planned: comparisons (`=`, `<>`, `<`, `<=`, `>`, `>=`), `AND`, `OR`, `NOT`,
//! `IS [NOT] NULL`, constants, bind parameters in comparisons (their values
//! sent back by the shards), GROUP BY columns of the select list, and the
//! aggregates the merge combines. Anything else is refused (0A000) naming it.

use std::cmp::Ordering;

use pg_query::protobuf::{self, a_const, node::Node as N, Node};

use super::merge::Row;
use super::value::{self, Order};
use super::{refuse, FanoutError};

/// A HAVING condition over the columns of the combined groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Not(Box<Filter>),
    Compare { left: Operand, op: Comparison, right: Operand },
    IsNull { operand: Operand, negated: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operand {
    /// A column of the shards' answer (a group key or an aggregate).
    Column(usize),
    /// A numeric constant, as written.
    Number(String),
    /// A quoted constant.
    Text(String),
    Null,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Comparison {
    fn of(op: &str) -> Option<Comparison> {
        Some(match op {
            "=" => Comparison::Eq,
            "<>" | "!=" => Comparison::Ne,
            "<" => Comparison::Lt,
            "<=" => Comparison::Le,
            ">" => Comparison::Gt,
            ">=" => Comparison::Ge,
            _ => return None,
        })
    }

    fn holds(self, o: Ordering) -> bool {
        match self {
            Comparison::Eq => o.is_eq(),
            Comparison::Ne => o.is_ne(),
            Comparison::Lt => o.is_lt(),
            Comparison::Le => o.is_le(),
            Comparison::Gt => o.is_gt(),
            Comparison::Ge => o.is_ge(),
        }
    }
}

fn refuse_in_having(what: &str) -> FanoutError {
    refuse(&format!("{what} in HAVING"))
}

/// Gives the answer's column for a column reference, an aggregate or a bind
/// parameter (adding a hidden one where needed), or None for an expression
/// that is none of these. A parameter comes with the comparison it stands in,
/// which decides its type.
pub(super) type Columns<'a> = dyn FnMut(&Node, Option<&Node>) -> Result<Option<usize>, FanoutError> + 'a;

/// Plans the condition `expr`.
pub(super) fn plan(expr: &Node, column: &mut Columns<'_>) -> Result<Filter, FanoutError> {
    use protobuf::BoolExprType as B;
    match &expr.node {
        Some(N::BoolExpr(b)) => {
            let args = b.args.iter().map(|a| plan(a, column)).collect::<Result<Vec<_>, _>>()?;
            match B::try_from(b.boolop) {
                Ok(B::AndExpr) => Ok(Filter::And(args)),
                Ok(B::OrExpr) => Ok(Filter::Or(args)),
                Ok(B::NotExpr) => match <[Filter; 1]>::try_from(args) {
                    Ok([f]) => Ok(Filter::Not(Box::new(f))),
                    Err(_) => Err(refuse_in_having("this NOT")),
                },
                _ => Err(refuse_in_having("this boolean expression")),
            }
        }
        Some(N::AExpr(e)) => {
            let op = match (protobuf::AExprKind::try_from(e.kind), Comparison::of(&operator(e))) {
                (Ok(protobuf::AExprKind::AexprOp), Some(op)) if e.name.len() == 1 => op,
                _ => return Err(refuse_in_having(&describe(expr))),
            };
            let side = |n: Option<&Node>, column: &mut Columns<'_>| {
                n.ok_or_else(|| refuse_in_having("a prefix operator")).and_then(|n| operand(n, Some(expr), column))
            };
            let left = side(e.lexpr.as_deref(), column)?;
            let right = side(e.rexpr.as_deref(), column)?;
            Ok(Filter::Compare { left, op, right })
        }
        Some(N::NullTest(t)) => {
            let arg = t.arg.as_deref().ok_or_else(|| refuse_in_having("IS NULL"))?;
            let negated = t.nulltesttype == protobuf::NullTestType::IsNotNull as i32;
            Ok(Filter::IsNull { operand: operand(arg, None, column)?, negated })
        }
        _ => Err(refuse_in_having(&describe(expr))),
    }
}

fn operand(n: &Node, within: Option<&Node>, column: &mut Columns<'_>) -> Result<Operand, FanoutError> {
    if let Some(N::AConst(c)) = &n.node {
        return match &c.val {
            None => Ok(Operand::Null),
            Some(a_const::Val::Ival(i)) => Ok(Operand::Number(i.ival.to_string())),
            // Numbers compare by their digits: `1.5e3` is not written so.
            Some(a_const::Val::Fval(f)) if plain_decimal(&f.fval) => Ok(Operand::Number(f.fval.clone())),
            Some(a_const::Val::Fval(_)) => Err(refuse_in_having("a number in exponent notation")),
            Some(a_const::Val::Sval(s)) => Ok(Operand::Text(s.sval.clone())),
            Some(_) => Err(refuse_in_having("this constant")),
        };
    }
    match column(n, within)? {
        Some(i) => Ok(Operand::Column(i)),
        None => Err(refuse_in_having(&describe(n))),
    }
}

/// An operator's name (`>`, `+`, `BETWEEN` …).
fn operator(e: &protobuf::AExpr) -> String {
    match e.name.last().and_then(|n| n.node.as_ref()) {
        Some(N::String(s)) => s.sval.clone(),
        _ => String::new(),
    }
}

/// `-12.50`, `.5`, `7`: digits and at most one point.
fn plain_decimal(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    digits.bytes().filter(|&c| c == b'.').count() <= 1
        && digits.bytes().any(|c| c.is_ascii_digit())
        && digits.bytes().all(|c| c.is_ascii_digit() || c == b'.')
}

/// How a refusal names an expression.
fn describe(n: &Node) -> String {
    match &n.node {
        Some(N::ColumnRef(_)) => "a column that is not a GROUP BY column of the select list".into(),
        Some(N::FuncCall(f)) => {
            let name = f.funcname.last().and_then(|n| match &n.node {
                Some(N::String(s)) => Some(s.sval.clone()),
                _ => None,
            });
            format!("{}()", name.unwrap_or_default())
        }
        Some(N::TypeCast(_)) => "a type cast".into(),
        Some(N::SubLink(_)) => "a subquery".into(),
        // Only a comparison gives a parameter its type.
        Some(N::ParamRef(p)) => format!("a parameter (${}) outside a comparison", p.number),
        Some(N::AExpr(e)) => format!("the operator {}", operator(e)),
        _ => "this expression".into(),
    }
}

impl Filter {
    /// Whether a combined group passes: only when the condition is true (NULL,
    /// as in SQL, drops it).
    pub(super) fn keeps(&self, row: &Row, types: &[i32], c_collation: bool) -> Result<bool, FanoutError> {
        Ok(self.eval(row, types, c_collation)? == Some(true))
    }

    /// Three-valued: None is SQL's NULL.
    fn eval(&self, row: &Row, types: &[i32], c: bool) -> Result<Option<bool>, FanoutError> {
        match self {
            Filter::And(all) => connective(all, false, row, types, c),
            Filter::Or(any) => connective(any, true, row, types, c),
            Filter::Not(f) => Ok(f.eval(row, types, c)?.map(|b| !b)),
            Filter::IsNull { operand, negated } => Ok(Some(operand.value(row)?.is_none() != *negated)),
            Filter::Compare { left, op, right } => {
                let (Some(a), Some(b)) = (left.value(row)?, right.value(row)?) else { return Ok(None) };
                let order = comparison_order(left, right, types, c)?;
                value::check_sortable(order, a)?;
                value::check_sortable(order, b)?;
                Ok(Some(op.holds(value::compare(order, a, b))))
            }
        }
    }
}

/// AND (`decisive` false) or OR (`decisive` true) of three-valued parts: the
/// decisive value wins, then NULL, then the other.
fn connective(
    parts: &[Filter],
    decisive: bool,
    row: &Row,
    types: &[i32],
    c: bool,
) -> Result<Option<bool>, FanoutError> {
    let mut out = Some(!decisive);
    for f in parts {
        match f.eval(row, types, c)? {
            Some(v) if v == decisive => return Ok(Some(decisive)),
            None => out = None,
            Some(_) => {}
        }
    }
    Ok(out)
}

impl Operand {
    fn value<'a>(&'a self, row: &'a Row) -> Result<Option<&'a [u8]>, FanoutError> {
        Ok(match self {
            Operand::Column(i) => {
                row.get(*i).ok_or_else(|| refuse_in_having("a column the shards did not send"))?.as_deref()
            }
            Operand::Number(s) | Operand::Text(s) => Some(s.as_bytes()),
            Operand::Null => None,
        })
    }
}

/// How two operands compare, as Postgres would resolve the operator: numbers
/// of any type by value (float when either is a float), a quoted constant as
/// the text type it is compared with. Other pairs are refused.
fn comparison_order(left: &Operand, right: &Operand, types: &[i32], c: bool) -> Result<Order, FanoutError> {
    let order_of = |i: usize| -> Result<Order, FanoutError> {
        let t = types.get(i).copied().ok_or_else(|| refuse_in_having("a column the shards did not send"))?;
        // Integers compare as numerics: a constant may have a fraction.
        Ok(match value::order_for(t, c)? {
            Order::Integer => Order::Numeric,
            o => o,
        })
    };
    let numeric = |o: Order| matches!(o, Order::Numeric | Order::Float);
    let textual = |o: Order| matches!(o, Order::Bytes | Order::Padded);
    match (left, right) {
        (Operand::Column(a), Operand::Column(b)) => match (order_of(*a)?, order_of(*b)?) {
            (x, y) if x == y => Ok(x),
            (x, y) if numeric(x) && numeric(y) => Ok(Order::Float),
            _ => Err(refuse_in_having("comparing values of different kinds")),
        },
        (Operand::Column(i), Operand::Number(_)) | (Operand::Number(_), Operand::Column(i)) => match order_of(*i)? {
            o if numeric(o) => Ok(o),
            _ => Err(refuse_in_having("comparing a value that is not a number with a number")),
        },
        (Operand::Column(i), Operand::Text(_)) | (Operand::Text(_), Operand::Column(i)) => match order_of(*i)? {
            o if textual(o) => Ok(o),
            _ => Err(refuse_in_having("comparing a value that is not text with a quoted constant")),
        },
        _ => Err(refuse_in_having("comparing two constants")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(condition: &str, columns: &[&str]) -> Result<Filter, FanoutError> {
        let sql = format!("select 1 from t having {condition}");
        let parsed = pg_query::parse(&sql, 0).unwrap();
        let Some(N::SelectStmt(sel)) = parsed.protobuf.stmts[0].stmt.as_ref().and_then(|s| s.node.as_ref()) else {
            unreachable!()
        };
        let mut column = |n: &Node, _: Option<&Node>| -> Result<Option<usize>, FanoutError> {
            let text = match &n.node {
                Some(N::ColumnRef(c)) => match c.fields.last().and_then(|f| f.node.as_ref()) {
                    Some(N::String(s)) => s.sval.clone(),
                    _ => return Ok(None),
                },
                Some(N::FuncCall(_)) => describe(n),
                _ => return Ok(None),
            };
            Ok(columns.iter().position(|c| *c == text))
        };
        plan(sel.having_clause.as_deref().unwrap(), &mut column)
    }

    fn row(values: &[Option<&str>]) -> Row {
        values.iter().map(|v| v.map(|s| s.as_bytes().to_vec())).collect()
    }

    #[test]
    fn conditions_follow_three_valued_logic() {
        let types = [value::INT8, value::NUMERIC, value::TEXT];
        let f = filter("count() > 2 and (sum() >= 10.5 or not max() = 'x')", &["count()", "sum()", "max()"]).unwrap();
        let keeps = |r: &[Option<&str>]| f.keeps(&row(r), &types, true).unwrap();
        assert!(keeps(&[Some("3"), Some("10.50"), Some("x")]));
        assert!(!keeps(&[Some("2"), Some("99"), Some("y")]));
        assert!(keeps(&[Some("3"), Some("1"), Some("y")]));
        // NULL OR false is NULL, and NULL drops the group.
        assert!(!keeps(&[Some("3"), None, Some("x")]));
        assert!(keeps(&[Some("3"), None, Some("y")]));
        let f = filter("count() > -1 and sum() < .5", &["count()", "sum()"]).unwrap();
        assert!(f.keeps(&row(&[Some("0"), Some("0.49")]), &types, true).unwrap());
        assert!(!f.keeps(&row(&[Some("0"), Some("0.5")]), &types, true).unwrap());
        let f = filter("sum() is null", &["count()", "sum()"]).unwrap();
        assert!(f.keeps(&row(&[Some("1"), None]), &types, true).unwrap());
    }

    #[test]
    fn what_is_not_evaluated_exactly_is_refused_by_name() {
        for (condition, named) in [
            ("sum() + 1 > 2", "operator +"),
            ("stddev(x) > 1", "stddev()"),
            ("sum() > 1::numeric", "type cast"),
            ("sum() between 1 and 2", "operator"),
            ("other > 1", "not a GROUP BY column"),
            ("$1 is null", "parameter ($1) outside a comparison"),
            ("sum() > 1.5e3", "exponent notation"),
        ] {
            let e = filter(condition, &["sum()"]).unwrap_err().to_string();
            assert!(e.contains(named) && e.contains("HAVING"), "{condition}: {e}");
        }
        let f = filter("max() > 5", &["max()"]).unwrap();
        assert!(f.keeps(&row(&[Some("x")]), &[value::TEXT], true).is_err(), "text compared with a number");
    }
}
