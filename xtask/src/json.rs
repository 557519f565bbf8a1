//! A small JSON reader, enough for the files xtask reads: cargo's messages and the benchmark
//! results of `sluice bench` and the PyTorch anchor. xtask has no dependencies, so no serde.
//!
//! It follows RFC 8259, plus the three non-finite numbers Python's `json.dump` writes by default
//! (`NaN`, `Infinity`, `-Infinity`), so a file from the anchor never fails to parse on them.

use std::fmt;

/// Nesting deeper than this is refused rather than risking the stack.
const MAX_DEPTH: usize = 128;

/// A parsed JSON value. Objects keep their keys in file order.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null`
    Null,
    /// `true` or `false`
    Bool(bool),
    /// Any number, as `f64`.
    Number(f64),
    /// A string with its escapes resolved.
    String(String),
    /// `[...]`
    Array(Vec<Value>),
    /// `{...}` as (key, value) pairs in file order.
    Object(Vec<(String, Value)>),
}

impl Value {
    /// The value under `key` if this is an object that has it (the first one, if repeated).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The number, if this is one.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(n) => Some(*n),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The members, if this is an object.
    pub fn as_object(&self) -> Option<&[(String, Value)]> {
        match self {
            Value::Object(members) => Some(members),
            _ => None,
        }
    }
}

/// Why a text is not JSON, and where (byte offset, line and column, both from 1).
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    /// Byte offset of the problem.
    pub offset: usize,
    /// Line of the problem, from 1.
    pub line: usize,
    /// Column (in bytes) of the problem, from 1.
    pub column: usize,
    /// What was wrong.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {} column {}: {}", self.line, self.column, self.message)
    }
}

impl std::error::Error for ParseError {}

/// Parses a whole document: one value, optionally surrounded by whitespace.
pub fn parse(text: &str) -> Result<Value, ParseError> {
    let mut parser = Parser { text: text.as_bytes(), pos: 0 };
    parser.skip_whitespace();
    let value = parser.value(0)?;
    parser.skip_whitespace();
    if parser.pos != parser.text.len() {
        return Err(parser.error("unexpected text after the value"));
    }
    Ok(value)
}

struct Parser<'a> {
    text: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, message: impl Into<String>) -> ParseError {
        let before = &self.text[..self.pos.min(self.text.len())];
        let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
        let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        ParseError {
            offset: self.pos,
            line,
            column: self.pos - line_start + 1,
            message: message.into(),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    /// Consumes `word` if the text continues with it.
    fn eat(&mut self, word: &str) -> bool {
        let matched = self.text[self.pos..].starts_with(word.as_bytes());
        if matched {
            self.pos += word.len();
        }
        matched
    }

    fn expect(&mut self, byte: u8) -> Result<(), ParseError> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(format!("expected `{}`", byte as char)))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, ParseError> {
        match self.peek() {
            None => Err(self.error("unexpected end of input, expected a value")),
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => self.string().map(Value::String),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) if self.eat("true") => Ok(Value::Bool(true)),
            Some(_) if self.eat("false") => Ok(Value::Bool(false)),
            Some(_) if self.eat("null") => Ok(Value::Null),
            Some(_) if self.eat("NaN") => Ok(Value::Number(f64::NAN)),
            Some(_) if self.eat("Infinity") => Ok(Value::Number(f64::INFINITY)),
            Some(_) => Err(self.error("expected a value")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.error(format!("nested deeper than {MAX_DEPTH}")));
        }
        self.pos += 1; // `{`
        let mut members = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Object(members));
        }
        loop {
            self.skip_whitespace();
            if self.peek() != Some(b'"') {
                return Err(self.error("expected a string key"));
            }
            let key = self.string()?;
            self.skip_whitespace();
            self.expect(b':')?;
            self.skip_whitespace();
            let value = self.value(depth)?;
            members.push((key, value));
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Object(members));
                }
                _ => return Err(self.error("expected `,` or `}` in an object")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.error(format!("nested deeper than {MAX_DEPTH}")));
        }
        self.pos += 1; // `[`
        let mut items = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.skip_whitespace();
            items.push(self.value(depth)?);
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.error("expected `,` or `]` in an array")),
            }
        }
    }

    /// A string starting at the opening quote; resolves escapes, including surrogate pairs.
    fn string(&mut self) -> Result<String, ParseError> {
        self.pos += 1; // opening quote
        let mut out = Vec::new();
        loop {
            let Some(byte) = self.peek() else {
                return Err(self.error("unterminated string"));
            };
            match byte {
                b'"' => {
                    self.pos += 1;
                    // The input is a &str and escapes only add whole characters, so this holds.
                    return String::from_utf8(out).map_err(|_| self.error("invalid UTF-8"));
                }
                b'\\' => {
                    self.pos += 1;
                    let escaped = self.escape()?;
                    let mut buffer = [0; 4];
                    out.extend_from_slice(escaped.encode_utf8(&mut buffer).as_bytes());
                }
                0x00..=0x1f => return Err(self.error("control character in a string")),
                _ => {
                    out.push(byte);
                    self.pos += 1;
                }
            }
        }
    }

    /// The character of an escape sequence; `pos` is just after the backslash.
    fn escape(&mut self) -> Result<char, ParseError> {
        let Some(kind) = self.peek() else {
            return Err(self.error("unterminated escape"));
        };
        self.pos += 1;
        Ok(match kind {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let first = self.hex4()?;
                let code = if (0xd800..0xdc00).contains(&first) {
                    if !self.eat("\\u") {
                        return Err(self.error("high surrogate without a low surrogate"));
                    }
                    let second = self.hex4()?;
                    if !(0xdc00..0xe000).contains(&second) {
                        return Err(self.error("high surrogate without a low surrogate"));
                    }
                    0x10000 + ((first - 0xd800) << 10) + (second - 0xdc00)
                } else {
                    first
                };
                char::from_u32(code).ok_or_else(|| self.error("lone surrogate in \\u escape"))?
            }
            _ => {
                self.pos -= 1;
                return Err(self.error("unknown escape"));
            }
        })
    }

    fn hex4(&mut self) -> Result<u32, ParseError> {
        let digits = self
            .text
            .get(self.pos..self.pos + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .filter(|d| d.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| self.error("expected 4 hex digits after \\u"))?;
        let code = u32::from_str_radix(digits, 16).map_err(|_| self.error("bad \\u escape"))?;
        self.pos += 4;
        Ok(code)
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`, or `-Infinity`.
    fn number(&mut self) -> Result<Value, ParseError> {
        let start = self.pos;
        if self.eat("-Infinity") {
            return Ok(Value::Number(f64::NEG_INFINITY));
        }
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.error("expected a digit")),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.error("expected a digit after `.`"));
            }
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.error("expected a digit in the exponent"));
            }
            self.digits();
        }
        // The grammar above admits only ASCII, which Rust's float parser accepts.
        std::str::from_utf8(&self.text[start..self.pos])
            .ok()
            .and_then(|digits| digits.parse::<f64>().ok())
            .map(Value::Number)
            .ok_or_else(|| self.error("bad number"))
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> ParseError {
        parse(text).expect_err(text)
    }

    #[test]
    fn scalars() {
        assert_eq!(parse("null"), Ok(Value::Null));
        assert_eq!(parse(" true "), Ok(Value::Bool(true)));
        assert_eq!(parse("false"), Ok(Value::Bool(false)));
        assert_eq!(parse("0"), Ok(Value::Number(0.0)));
        assert_eq!(parse("-12.5e-1"), Ok(Value::Number(-1.25)));
        assert_eq!(parse("3E2"), Ok(Value::Number(300.0)));
        assert_eq!(parse("0.000123"), Ok(Value::Number(0.000123)));
    }

    #[test]
    fn python_non_finite_numbers() {
        assert!(parse("NaN").ok().and_then(|v| v.as_f64()).is_some_and(f64::is_nan));
        assert_eq!(parse("Infinity"), Ok(Value::Number(f64::INFINITY)));
        assert_eq!(parse("[-Infinity]"), Ok(Value::Array(vec![Value::Number(f64::NEG_INFINITY)])));
    }

    #[test]
    fn strings_and_escapes() {
        let value = parse(r#""a\"b\\c\/d\n\t\u00e9\ud83d\ude00é""#).expect("valid string");
        assert_eq!(value.as_str(), Some("a\"b\\c/d\n\té😀é"));
    }

    #[test]
    fn nested_document_keeps_order_and_lookups_work() {
        let text = r#"{"results": {"v3": {"1": {"gate_best": 0.05, "lin_f32": 0.11}}},
                       "list": [1, "two", null, [], {}], "z": true}"#;
        let doc = parse(text).expect("valid document");
        let cell = doc.get("results").and_then(|r| r.get("v3")).and_then(|s| s.get("1"));
        assert_eq!(cell.and_then(|c| c.get("gate_best")).and_then(Value::as_f64), Some(0.05));
        let keys: Vec<&str> = cell
            .and_then(Value::as_object)
            .unwrap_or(&[])
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(keys, ["gate_best", "lin_f32"]);
        let list = doc.get("list").and_then(Value::as_array).expect("array");
        assert_eq!(list.len(), 5);
        assert_eq!(list[1].as_str(), Some("two"));
        assert_eq!(list[2], Value::Null);
        assert_eq!(doc.get("missing"), None);
        assert_eq!(doc.get("z"), Some(&Value::Bool(true)));
        assert_eq!(list[0].get("anything"), None);
    }

    #[test]
    fn malformed_input_is_an_error_with_a_position() {
        for bad in [
            "",
            "{",
            "[1,]",
            "[1 2]",
            r#"{"a" 1}"#,
            r#"{"a":1,}"#,
            "{1:2}",
            "01",
            "1.",
            "-",
            "1e",
            "+1",
            "tru",
            r#""abc"#,
            r#""\x""#,
            r#""\u12g4""#,
            r#""\ud800""#,
            r#""\udc00""#,
            "\"a\u{1}b\"",
            "1 2",
            "nul",
        ] {
            let error = error_of(bad);
            assert!(error.offset <= bad.len(), "{bad:?}: offset {}", error.offset);
        }
        let error = error_of("{\n  \"a\": [1,\n   x]}");
        assert_eq!((error.line, error.column), (3, 4));
        assert!(error.to_string().starts_with("line 3 column 4: "), "{error}");
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let deep = "[".repeat(100_000);
        assert!(error_of(&deep).message.contains("nested deeper"));
        let fine = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse(&fine).is_ok());
    }
}
