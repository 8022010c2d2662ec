//! An array of tenant keys bound to one parameter (`WHERE tenant_id = ANY($1)`):
//! its elements, read from Postgres's text or binary array format, so the
//! statement goes to just the shards holding those tenants.

/// The elements of a one-dimensional array in the text format (`{1,2,3}`,
/// `{"a b",c,NULL}`); None for a NULL element.
pub fn text_elements(s: &str) -> Result<Vec<Option<String>>, String> {
    let s = s.trim();
    // An explicit lower bound (`[0:2]={…}`) changes nothing here.
    let s = match s.strip_prefix('[') {
        Some(_) => s.split_once('=').map(|(_, rest)| rest.trim()).ok_or("a malformed array bound")?,
        None => s,
    };
    let inner = s.strip_prefix('{').and_then(|r| r.strip_suffix('}')).ok_or("an array must be enclosed in { }")?;
    let mut out = Vec::new();
    if inner.trim().is_empty() {
        return Ok(out);
    }
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let (value, quoted) = match chars.peek() {
            Some('{') => return Err("a multi-dimensional array cannot hold tenant keys".into()),
            Some('"') => {
                chars.next();
                let mut v = String::new();
                loop {
                    match chars.next() {
                        Some('\\') => v.push(chars.next().ok_or("an unfinished escape")?),
                        Some('"') => break,
                        Some(c) => v.push(c),
                        None => return Err("an unfinished quoted element".into()),
                    }
                }
                (v, true)
            }
            _ => {
                let mut v = String::new();
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    chars.next();
                    if c == '\\' {
                        v.push(chars.next().ok_or("an unfinished escape")?);
                    } else {
                        v.push(c);
                    }
                }
                (v.trim_end().to_string(), false)
            }
        };
        out.push((quoted || !value.eq_ignore_ascii_case("NULL")).then_some(value));
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next() {
            None => return Ok(out),
            Some(',') => continue,
            Some(c) => return Err(format!("unexpected {c:?} after an element")),
        }
    }
}

/// An array's element type and its elements (None for a NULL one).
pub type Elements<'a> = (i32, Vec<Option<&'a [u8]>>);

/// The element type and the elements of a one-dimensional array in the binary
/// format (`array_send`).
pub fn binary_elements(v: &[u8]) -> Result<Elements<'_>, String> {
    let mut r = Cursor { v, at: 0 };
    let dims = r.i32()?;
    let _has_nulls = r.i32()?;
    let elem_type = r.i32()?;
    match dims {
        0 => return Ok((elem_type, Vec::new())),
        1 => {}
        _ => return Err("a multi-dimensional array cannot hold tenant keys".into()),
    }
    let len = r.i32()?;
    let _lower_bound = r.i32()?;
    if len < 0 {
        return Err("a negative array length".into());
    }
    let mut out = Vec::with_capacity(len.min(1 << 16) as usize);
    for _ in 0..len {
        let n = r.i32()?;
        out.push(if n < 0 { None } else { Some(r.bytes(n as usize)?) });
    }
    Ok((elem_type, out))
}

/// Reads a binary array front to back.
struct Cursor<'a> {
    v: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let b = self.v.get(self.at..self.at.saturating_add(n)).ok_or("a binary array cut short")?;
        self.at += n;
        Ok(b)
    }

    fn i32(&mut self) -> Result<i32, String> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_arrays_read_as_postgres_writes_them() {
        let s = |v: &[Option<&str>]| v.iter().map(|x| x.map(str::to_string)).collect::<Vec<_>>();
        assert_eq!(text_elements("{1,2,3}").unwrap(), s(&[Some("1"), Some("2"), Some("3")]));
        assert_eq!(text_elements("{}").unwrap(), s(&[]));
        assert_eq!(
            text_elements(r#"{"a b",c,NULL,"NULL","x\"y"}"#).unwrap(),
            s(&[Some("a b"), Some("c"), None, Some("NULL"), Some("x\"y")])
        );
        assert_eq!(text_elements(" { 7 , 8 } ").unwrap(), s(&[Some("7"), Some("8")]));
        assert_eq!(text_elements("[0:1]={5,6}").unwrap(), s(&[Some("5"), Some("6")]));
        assert!(text_elements("{{1,2},{3,4}}").is_err());
        assert!(text_elements("1,2").is_err());
        assert!(text_elements("{\"open").is_err());
    }

    #[test]
    fn binary_arrays_read_as_array_send_writes_them() {
        let mut v = Vec::new();
        for x in [1i32, 1, 20, 3, 1] {
            v.extend(x.to_be_bytes()); // 1 dim, has nulls, int8, 3 elements, lower bound 1
        }
        v.extend(8i32.to_be_bytes());
        v.extend(42i64.to_be_bytes());
        v.extend((-1i32).to_be_bytes());
        v.extend(8i32.to_be_bytes());
        v.extend(7i64.to_be_bytes());
        let (t, items) = binary_elements(&v).unwrap();
        assert_eq!(t, 20);
        assert_eq!(items, vec![Some(&42i64.to_be_bytes()[..]), None, Some(&7i64.to_be_bytes()[..])]);
        assert!(binary_elements(&v[..v.len() - 1]).is_err(), "cut short");
        let empty: Vec<u8> = [0i32, 0, 20].iter().flat_map(|x| x.to_be_bytes()).collect();
        assert_eq!(binary_elements(&empty).unwrap(), (20, vec![]));
    }
}
