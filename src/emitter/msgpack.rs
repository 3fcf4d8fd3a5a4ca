//! A bounded MessagePack reader for what socket.io's Redis emitters publish, straight into JSON
//! values: nesting is limited, a declared length is checked against the bytes that remain
//! before anything is allocated for it, and the `Date` and `undefined` encodings of the
//! emitters' msgpack libraries become an RFC 3339 string and `null`. `rmp` names the markers.

use rmp::Marker;
use serde_json::{Map, Number, Value};

/// Deepest nesting of arrays and maps accepted, counting the message's own array as 1.
pub const MAX_DEPTH: usize = 32;

/// Which msgpack library wrote the bytes. They agree except where `msgpack-js` (the oldest
/// emitters) extended the msgpack of its day: `0xc4` is `undefined`, `0xd8`/`0xd9` are
/// buffers, and there are no extension types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Today's msgpack (`msgpack-lite`, `notepack.io`).
    Current,
    /// `msgpack-js`.
    Legacy,
}

/// Why bytes were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not msgpack, truncated, trailing bytes, or a length beyond the message.
    Malformed,
    /// Nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// Well-formed, but it holds binary data (a buffer, or an extension type that is not a
    /// date or `undefined`).
    Binary,
}

/// Decodes one complete msgpack value. Binary data is read past (its length checked like any
/// other), so that `Binary` is only ever the answer for a message that is well-formed
/// throughout.
pub fn decode(bytes: &[u8], dialect: Dialect) -> Result<Value, Refusal> {
    let mut reader = Reader {
        rest: bytes,
        dialect,
        binary: false,
    };
    let value = reader.value(0)?;
    match (reader.rest.is_empty(), reader.binary) {
        (false, _) => Err(Refusal::Malformed),
        (true, true) => Err(Refusal::Binary),
        (true, false) => Ok(value),
    }
}

struct Reader<'a> {
    rest: &'a [u8],
    dialect: Dialect,
    /// Binary data was read past.
    binary: bool,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Refusal> {
        if n > self.rest.len() {
            return Err(Refusal::Malformed);
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Refusal> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u8(&mut self) -> Result<usize, Refusal> {
        Ok(self.array::<1>()?[0] as usize)
    }

    fn u16(&mut self) -> Result<usize, Refusal> {
        Ok(u16::from_be_bytes(self.array()?) as usize)
    }

    fn u32(&mut self) -> Result<usize, Refusal> {
        Ok(u32::from_be_bytes(self.array()?) as usize)
    }

    fn value(&mut self, depth: usize) -> Result<Value, Refusal> {
        let legacy = self.dialect == Dialect::Legacy;
        let marker = Marker::from_u8(self.array::<1>()?[0]);
        Ok(match marker {
            Marker::FixPos(n) => Value::from(n),
            Marker::FixNeg(n) => Value::from(n),
            Marker::Null => Value::Null,
            Marker::True => Value::Bool(true),
            Marker::False => Value::Bool(false),
            Marker::U8 => Value::from(self.array::<1>()?[0]),
            Marker::U16 => Value::from(u16::from_be_bytes(self.array()?)),
            Marker::U32 => Value::from(u32::from_be_bytes(self.array()?)),
            Marker::U64 => Value::from(u64::from_be_bytes(self.array()?)),
            Marker::I8 => Value::from(i8::from_be_bytes(self.array()?)),
            Marker::I16 => Value::from(i16::from_be_bytes(self.array()?)),
            Marker::I32 => Value::from(i32::from_be_bytes(self.array()?)),
            Marker::I64 => Value::from(i64::from_be_bytes(self.array()?)),
            Marker::F32 => float(f32::from_be_bytes(self.array()?) as f64),
            Marker::F64 => float(f64::from_be_bytes(self.array()?)),
            Marker::FixStr(n) => self.string(n as usize)?,
            // msgpack-js: `undefined`, and buffers where today's msgpack has fixext 16 and str 8.
            Marker::Bin8 if legacy => Value::Null,
            Marker::FixExt16 if legacy => {
                let n = self.u16()?;
                self.skip_binary(n)?
            }
            Marker::Str8 if legacy => {
                let n = self.u32()?;
                self.skip_binary(n)?
            }
            Marker::Str8 => {
                let n = self.u8()?;
                self.string(n)?
            }
            Marker::Str16 => {
                let n = self.u16()?;
                self.string(n)?
            }
            Marker::Str32 => {
                let n = self.u32()?;
                self.string(n)?
            }
            Marker::Bin8 => {
                let n = self.u8()?;
                self.skip_binary(n)?
            }
            Marker::Bin16 if !legacy => {
                let n = self.u16()?;
                self.skip_binary(n)?
            }
            Marker::Bin32 if !legacy => {
                let n = self.u32()?;
                self.skip_binary(n)?
            }
            Marker::FixArray(n) => self.list(n as usize, depth)?,
            Marker::Array16 => {
                let n = self.u16()?;
                self.list(n, depth)?
            }
            Marker::Array32 => {
                let n = self.u32()?;
                self.list(n, depth)?
            }
            Marker::FixMap(n) => self.map(n as usize, depth)?,
            Marker::Map16 => {
                let n = self.u16()?;
                self.map(n, depth)?
            }
            Marker::Map32 => {
                let n = self.u32()?;
                self.map(n, depth)?
            }
            _ if legacy => return Err(Refusal::Malformed),
            Marker::FixExt1 => self.ext(1)?,
            Marker::FixExt2 => self.ext(2)?,
            Marker::FixExt4 => self.ext(4)?,
            Marker::FixExt8 => self.ext(8)?,
            Marker::FixExt16 => self.ext(16)?,
            Marker::Ext8 => {
                let n = self.u8()?;
                self.ext(n)?
            }
            Marker::Ext16 => {
                let n = self.u16()?;
                self.ext(n)?
            }
            Marker::Ext32 => {
                let n = self.u32()?;
                self.ext(n)?
            }
            _ => return Err(Refusal::Malformed),
        })
    }

    /// Reads past `n` bytes of binary data.
    fn skip_binary(&mut self, n: usize) -> Result<Value, Refusal> {
        self.take(n)?;
        self.binary = true;
        Ok(Value::Null)
    }

    fn string(&mut self, n: usize) -> Result<Value, Refusal> {
        let bytes = self.take(n)?;
        Ok(Value::String(String::from_utf8_lossy(bytes).into_owned()))
    }

    /// Opens a container of `n` items of at least `min` bytes each.
    fn open(&self, n: usize, min: usize, depth: usize) -> Result<usize, Refusal> {
        if depth + 1 > MAX_DEPTH {
            return Err(Refusal::TooDeep);
        }
        if n.saturating_mul(min) > self.rest.len() {
            return Err(Refusal::Malformed);
        }
        Ok(depth + 1)
    }

    fn list(&mut self, n: usize, depth: usize) -> Result<Value, Refusal> {
        let depth = self.open(n, 1, depth)?;
        let mut items = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            items.push(self.value(depth)?);
        }
        Ok(Value::Array(items))
    }

    fn map(&mut self, n: usize, depth: usize) -> Result<Value, Refusal> {
        let depth = self.open(n, 2, depth)?;
        let mut map = Map::new();
        for _ in 0..n {
            // JavaScript objects have string keys; a number key is its decimal text.
            let key = match self.value(depth)? {
                Value::String(s) => s,
                Value::Number(n) => n.to_string(),
                _ => return Err(Refusal::Malformed),
            };
            let value = self.value(depth)?;
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    }

    /// An extension value of `n` data bytes: the dates and `undefined` of the emitters'
    /// libraries; anything else is binary data.
    fn ext(&mut self, n: usize) -> Result<Value, Refusal> {
        let kind = self.array::<1>()?[0] as i8;
        let data = self.take(n)?;
        match (kind, n) {
            // notepack.io 1–2: `undefined` (fixext 1) and a date in milliseconds (fixext 8).
            (0, 1) => Ok(Value::Null),
            (0, 8) => Ok(date_ms(
                i64::from_be_bytes(data.try_into().expect("8 bytes")) as f64,
            )),
            // msgpack-lite: a date, its milliseconds encoded as one msgpack number.
            (0x0d, _) => number(data).map(date_ms).ok_or(Refusal::Malformed),
            // The msgpack timestamp (notepack.io 3): 32, 64 or 96 bits.
            (-1, 4) => {
                let s = u32::from_be_bytes(data.try_into().expect("4 bytes"));
                Ok(date(s as i64, 0))
            }
            (-1, 8) => {
                let v = u64::from_be_bytes(data.try_into().expect("8 bytes"));
                Ok(date((v & 0x3_ffff_ffff) as i64, (v >> 34) as u32))
            }
            (-1, 12) => {
                let ns = u32::from_be_bytes(data[..4].try_into().expect("4 bytes"));
                let s = i64::from_be_bytes(data[4..].try_into().expect("8 bytes"));
                Ok(date(s, ns))
            }
            (-1, _) => Err(Refusal::Malformed),
            _ => {
                self.binary = true;
                Ok(Value::Null)
            }
        }
    }
}

/// `data` when it is exactly one msgpack number (nothing nested).
fn number(data: &[u8]) -> Option<f64> {
    let (&first, rest) = data.split_first()?;
    let value = match Marker::from_u8(first) {
        Marker::FixPos(n) if rest.is_empty() => n as f64,
        Marker::FixNeg(n) if rest.is_empty() => n as f64,
        Marker::U8 => u8::from_be_bytes(rest.try_into().ok()?) as f64,
        Marker::U16 => u16::from_be_bytes(rest.try_into().ok()?) as f64,
        Marker::U32 => u32::from_be_bytes(rest.try_into().ok()?) as f64,
        Marker::U64 => u64::from_be_bytes(rest.try_into().ok()?) as f64,
        Marker::I8 => i8::from_be_bytes(rest.try_into().ok()?) as f64,
        Marker::I16 => i16::from_be_bytes(rest.try_into().ok()?) as f64,
        Marker::I32 => i32::from_be_bytes(rest.try_into().ok()?) as f64,
        Marker::I64 => i64::from_be_bytes(rest.try_into().ok()?) as f64,
        Marker::F32 => f32::from_be_bytes(rest.try_into().ok()?) as f64,
        Marker::F64 => f64::from_be_bytes(rest.try_into().ok()?),
        _ => return None,
    };
    Some(value)
}

/// A float as `JSON.stringify` writes it: a whole number without a fraction (the oldest
/// emitters send every number beyond 32 bits as a float), one that is not finite as `null`.
fn float(f: f64) -> Value {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if f.fract() == 0.0 && f.abs() <= EXACT {
        return Value::from(f as i64);
    }
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// A date given in milliseconds since 1970 (fractions dropped).
fn date_ms(ms: f64) -> Value {
    if !ms.is_finite() {
        return Value::Null;
    }
    let ms = ms.floor();
    let s = (ms / 1000.0).floor();
    date(s as i64, ((ms - s * 1000.0) as u32) * 1_000_000)
}

/// Milliseconds of JavaScript's date range either side of 1970: 100 million days.
const JS_DATE_RANGE_SECS: i64 = 8_640_000_000_000;

/// `s` seconds and `ns` nanoseconds after 1970 as JavaScript's `toISOString` writes them
/// (`2026-12-02T10:00:00.000Z`; years outside 0–9999 as `+YYYYYY`/`-YYYYYY`), or `null`
/// outside JavaScript's date range.
pub fn date(s: i64, ns: u32) -> Value {
    let beyond = s > JS_DATE_RANGE_SECS || (s == JS_DATE_RANGE_SECS && ns >= 1_000_000);
    if s < -JS_DATE_RANGE_SECS || beyond || ns >= 1_000_000_000 {
        return Value::Null;
    }
    let (days, secs) = (s.div_euclid(86_400), s.rem_euclid(86_400));
    let (year, month, day) = civil(days);
    let year = if (0..=9999).contains(&year) {
        format!("{year:04}")
    } else if year < 0 {
        format!("-{:06}", -year)
    } else {
        format!("+{year:06}")
    };
    Value::String(format!(
        "{year}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        ns / 1_000_000
    ))
}

/// The proleptic Gregorian date `days` after 1970-01-01 (the "civil from days" algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn current(hex: &str) -> Result<Value, Refusal> {
        decode(&hex_bytes(hex), Dialect::Current)
    }

    fn hex_bytes(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn dates_are_written_as_javascript_writes_them() {
        assert_eq!(date(0, 0), json!("1970-01-01T00:00:00.000Z"));
        assert_eq!(date(1_796_205_600, 0), json!("2026-12-02T10:00:00.000Z"));
        assert_eq!(
            date(951_782_400, 7_000_000),
            json!("2000-02-29T00:00:00.007Z")
        );
        assert_eq!(date(-1, 999_000_000), json!("1969-12-31T23:59:59.999Z"));
        assert_eq!(
            date(-62_198_755_200, 0),
            json!("-000001-01-01T00:00:00.000Z")
        );
        assert_eq!(
            date(253_402_300_800, 0),
            json!("+010000-01-01T00:00:00.000Z")
        );
        assert_eq!(date(JS_DATE_RANGE_SECS + 1, 0), Value::Null);
        assert_eq!(date(JS_DATE_RANGE_SECS, 1_000_000), Value::Null);
        assert_eq!(
            date(-JS_DATE_RANGE_SECS, 0),
            json!("-271821-04-20T00:00:00.000Z")
        );
        assert_eq!(date_ms(-1.0), json!("1969-12-31T23:59:59.999Z"));
        assert_eq!(date_ms(f64::NAN), Value::Null);
    }

    #[test]
    fn every_date_encoding_reads_as_the_same_instant() {
        let iso = json!("2026-12-02T10:00:00.000Z");
        // notepack.io 1–2: fixext 8, type 0, milliseconds.
        assert_eq!(current("d700000001a236325d00"), Ok(iso.clone()));
        // msgpack-lite: ext 8, type 13, the milliseconds as a float 64.
        assert_eq!(current("c7090dcb427a236325d00000"), Ok(iso.clone()));
        // notepack.io 3: timestamp 32, 64 (with nanoseconds) and 96.
        assert_eq!(current("d6ff6b0fec20"), Ok(iso.clone()));
        assert_eq!(
            current("d7ff0bebc2006b0fec20"),
            Ok(json!("2026-12-02T10:00:00.050Z"))
        );
        assert_eq!(
            current("c70cff00000000ffffffffffffffff"),
            Ok(json!("1969-12-31T23:59:59.000Z"))
        );
    }

    #[test]
    fn undefined_reads_as_null_in_each_dialect() {
        assert_eq!(current("d40000"), Ok(Value::Null));
        assert_eq!(decode(&[0xc4], Dialect::Legacy), Ok(Value::Null));
        // The same byte is a buffer today.
        assert_eq!(current("c40101"), Err(Refusal::Binary));
        assert_eq!(
            decode(&hex_bytes("d80001ff"), Dialect::Legacy),
            Err(Refusal::Binary)
        );
    }

    #[test]
    fn numbers_strings_and_containers() {
        assert_eq!(
            current("96cd0100d0fccb3ff8000000000000cf0020000000000000a3e282aca0"),
            Ok(json!([256, -4, 1.5, 9_007_199_254_740_992u64, "€", ""]))
        );
        assert_eq!(current("82a161c0017b"), Ok(json!({"a": null, "1": 123})));
        assert_eq!(current("cb7ff0000000000000"), Ok(Value::Null), "infinity");
        assert_eq!(current("cb41f0000000000000"), Ok(json!(4_294_967_296u64)));
        assert_eq!(current("cb8000000000000000"), Ok(json!(0)), "-0");
    }

    #[test]
    fn hostile_input_is_refused_without_allocating_for_it() {
        // Declared lengths far beyond the message.
        assert_eq!(current("dd7fffffff01"), Err(Refusal::Malformed));
        assert_eq!(current("df7fffffff"), Err(Refusal::Malformed));
        assert_eq!(current("db7fffffff61"), Err(Refusal::Malformed));
        assert_eq!(current("c9ffffffff00"), Err(Refusal::Malformed));
        // Truncated, trailing, reserved.
        assert_eq!(current("92a161"), Err(Refusal::Malformed));
        assert_eq!(current("c0c0"), Err(Refusal::Malformed));
        assert_eq!(current("c1"), Err(Refusal::Malformed));
        assert_eq!(current(""), Err(Refusal::Malformed));
        // 10,000 nested arrays, and exactly the limit.
        let mut deep = vec![0x91; 10_000];
        deep.push(0xc0);
        assert_eq!(decode(&deep, Dialect::Current), Err(Refusal::TooDeep));
        let mut limit = vec![0x91; MAX_DEPTH];
        limit.push(0xc0);
        assert!(decode(&limit, Dialect::Current).is_ok());
        limit.insert(0, 0x91);
        assert_eq!(decode(&limit, Dialect::Current), Err(Refusal::TooDeep));
        // A map key that is neither a string nor a number.
        assert_eq!(current("8190c0"), Err(Refusal::Malformed));
        // Other extension types are binary data.
        assert_eq!(current("d5050102"), Err(Refusal::Binary));
        // A msgpack-lite date holds one number, never anything nested: 16,000 dates inside
        // one another are refused at the first level.
        let mut dates = Vec::new();
        for _ in 0..16_000 {
            let inner = std::mem::take(&mut dates);
            dates.extend_from_slice(&[0xc8]);
            dates.extend_from_slice(&(inner.len() as u16).to_be_bytes());
            dates.push(0x0d);
            dates.extend_from_slice(&inner);
            if dates.len() > 60_000 {
                break;
            }
        }
        assert_eq!(decode(&dates, Dialect::Current), Err(Refusal::Malformed));
    }

    #[test]
    fn binary_is_only_the_answer_for_a_well_formed_message() {
        // A buffer of three bytes among other values: well-formed, so binary.
        assert_eq!(current("93c403010203a178c0"), Err(Refusal::Binary));
        // A buffer whose length runs past the end: malformed, whatever it holds.
        assert_eq!(current("92c4ff01"), Err(Refusal::Malformed));
        // msgpack-js's buffers are read past the same way.
        assert_eq!(
            decode(&hex_bytes("92d8000201ffc0"), Dialect::Legacy),
            Err(Refusal::Binary)
        );
    }
}
