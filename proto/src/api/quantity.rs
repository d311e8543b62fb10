//! Resource quantities as Kubernetes writes them: `250m`, `1`, `0.5`, `128Mi`, `2Gi`, `1e3`,
//! `1.5k`. Held exactly, in thousandths of a unit.

use std::fmt;
use std::ops::{Add, Sub};

/// A quantity string that does not parse; the message names the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantityError(pub String);

impl fmt::Display for QuantityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for QuantityError {}

/// A non-negative quantity, exactly, in thousandths of a unit (millicores for cpu,
/// millibytes for memory).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quantity(i128);

const BINARY: &[(&str, u32)] = &[
    ("Ki", 10),
    ("Mi", 20),
    ("Gi", 30),
    ("Ti", 40),
    ("Pi", 50),
    ("Ei", 60),
];
const DECIMAL: &[(&str, i64)] = &[
    ("n", -9),
    ("u", -6),
    ("m", -3),
    ("k", 3),
    ("M", 6),
    ("G", 9),
    ("T", 12),
    ("P", 15),
    ("E", 18),
];

impl Quantity {
    /// The largest quantity held: what 128 bits of thousandths hold (about 1.7 × 10^35).
    pub const MAX: Quantity = Quantity(i128::MAX);

    /// Parses every spelling Kubernetes accepts: a non-negative decimal number, then a
    /// binary suffix (Ki Mi Gi Ti Pi Ei), a decimal one (n u m "" k M G T P E) or a decimal
    /// exponent (`e3`, `E-2`). Refused, with a message naming the input: anything else, a
    /// value finer than a thousandth of a unit, and one larger than [`Quantity::MAX`].
    pub fn parse(s: &str) -> Result<Self, QuantityError> {
        let err = |why: String| QuantityError(format!("quantity {s:?}: {why}"));
        let too_large = || err("too large: a quantity must be at most about 1.7e35".into());
        let t = s.trim();
        if t.is_empty() {
            return Err(err("empty".into()));
        }
        let t = t.strip_prefix('+').unwrap_or(t);
        if t.starts_with('-') {
            return Err(err("must not be negative".into()));
        }
        let end = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, suffix) = t.split_at(end);
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(err("expected a number such as 1, 0.5 or 250m".into()));
        }
        let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
        // Zeros that change nothing must not make the number look too large or too precise.
        let frac_part = frac_part.trim_end_matches('0');
        let digits = format!("{}{frac_part}", int_part.trim_start_matches('0'));
        // value = mantissa × 10^exp10 × 2^exp2, exp10 counted in thousandths.
        let mut exp10: i64 = 3 - frac_part.len() as i64;
        let mut exp2: u32 = 0;
        // The suffixes first: `Ei` and `E` are suffixes, `E3` an exponent.
        if let Some((_, p)) = BINARY.iter().find(|(n, _)| *n == suffix) {
            exp2 = *p;
        } else if let Some((_, p)) = DECIMAL.iter().find(|(n, _)| *n == suffix) {
            exp10 += p;
        } else if let Some(e) = suffix.strip_prefix(['e', 'E']).filter(|e| !e.is_empty()) {
            let e: i64 = e
                .parse()
                .map_err(|_| err(format!("bad exponent {suffix:?}")))?;
            exp10 = exp10.saturating_add(e);
        } else if !suffix.is_empty() {
            return Err(err(format!("unknown suffix {suffix:?}")));
        }
        if digits.bytes().all(|d| d == b'0') {
            return Ok(Quantity(0));
        }
        // More digits than 128 bits hold is too large, whatever the exponent.
        let mantissa: i128 = digits.parse().map_err(|_| too_large())?;
        let v = if exp10 >= 0 {
            let scale = u32::try_from(exp10)
                .ok()
                .and_then(|e| 10i128.checked_pow(e))
                .ok_or_else(too_large)?;
            mantissa.checked_mul(scale).ok_or_else(too_large)?
        } else {
            // A non-zero mantissa below 2^127 is never a multiple of 10^39 or more.
            let div = u32::try_from(exp10.unsigned_abs())
                .ok()
                .and_then(|e| 10i128.checked_pow(e))
                .filter(|d| mantissa % d == 0)
                .ok_or_else(|| err("more precise than a thousandth of a unit".into()))?;
            mantissa / div
        };
        let v = v.checked_mul(1i128 << exp2).ok_or_else(too_large)?;
        Ok(Quantity(v))
    }

    pub fn from_millis(m: i128) -> Self {
        Quantity(m.max(0))
    }

    pub fn millis(&self) -> i128 {
        self.0
    }

    /// Whole units, rounded up (as Kubernetes' `Value()`).
    pub fn value_ceil(&self) -> i128 {
        self.0 / 1000 + i128::from(self.0 % 1000 != 0)
    }
}

/// Millicores of a cpu quantity; past 2^63 − 1, 2^63 − 1 (Kubernetes caps quantities there).
pub fn parse_cpu_millis(s: &str) -> Result<i64, QuantityError> {
    Ok(i64::try_from(Quantity::parse(s)?.millis()).unwrap_or(i64::MAX))
}

/// Bytes of a memory quantity (rounded up to a whole byte); past 2^63 − 1, 2^63 − 1
/// (Kubernetes caps quantities there).
pub fn parse_bytes(s: &str) -> Result<i64, QuantityError> {
    Ok(i64::try_from(Quantity::parse(s)?.value_ceil()).unwrap_or(i64::MAX))
}

impl std::str::FromStr for Quantity {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 % 1000 != 0 {
            return write!(f, "{}m", self.0);
        }
        let units = self.0 / 1000;
        for (suffix, p) in BINARY.iter().rev() {
            let m = 1i128 << p;
            if units >= m && units % m == 0 {
                return write!(f, "{}{suffix}", units / m);
            }
        }
        write!(f, "{units}")
    }
}

impl Add for Quantity {
    type Output = Quantity;
    fn add(self, o: Quantity) -> Quantity {
        Quantity(self.0.saturating_add(o.0))
    }
}

impl Sub for Quantity {
    type Output = Quantity;
    /// Saturates at zero: quantities are never negative.
    fn sub(self, o: Quantity) -> Quantity {
        Quantity((self.0 - o.0).max(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> i128 {
        Quantity::parse(s).unwrap().millis()
    }

    #[test]
    fn parses_kubernetes_spellings() {
        assert_eq!(m("250m"), 250);
        assert_eq!(m("1"), 1000);
        assert_eq!(m("0.5"), 500);
        assert_eq!(m("128Mi"), 134_217_728_000);
        assert_eq!(m("1Gi"), 1_073_741_824_000);
        assert_eq!(m("1e3"), 1_000_000);
        assert_eq!(m("1.5k"), 1_500_000);
        assert_eq!(m("2M"), 2_000_000_000);
        assert_eq!(parse_bytes("1Ki").unwrap(), 1024);
        assert_eq!(parse_cpu_millis("2").unwrap(), 2000);
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "", "0.0001", "-1", "12Q", "--1", "1.2.3", "m", ".", "1e", "1ee3",
        ] {
            let e = Quantity::parse(bad).unwrap_err();
            assert!(e.0.starts_with(&format!("quantity {bad:?}")), "{e}");
        }
        assert!(
            Quantity::parse("12Q")
                .unwrap_err()
                .0
                .contains("unknown suffix \"Q\"")
        );
    }

    #[test]
    fn every_kubernetes_suffix() {
        assert_eq!(m("5000000n"), 5);
        assert_eq!(m("2000u"), 2);
        assert_eq!(m("3k"), 3_000_000);
        assert_eq!(m("1T"), 10i128.pow(15));
        assert_eq!(m("1P"), 10i128.pow(18));
        assert_eq!(m("9E"), 9 * 10i128.pow(21));
        assert_eq!(m("1Ti"), 1000 << 40);
        assert_eq!(m("1Pi"), 1000 << 50);
        assert_eq!(m("9Ei"), 9000 << 60);
        assert_eq!(m("1E3"), 1_000_000);
        assert_eq!(m("25e-2"), 250);
        assert_eq!(m("0.000001e6"), 1000);
        assert_eq!(m("0e99999999999"), 0);
        assert_eq!(m("000000000000000000000000000000000000000000001"), 1000);
        assert_eq!(m("1.000000000000000000000000000000000000000000"), 1000);
        // Kubernetes caps quantities at 2^63 - 1 when used as a number; so do we.
        assert_eq!(parse_bytes("9Ei").unwrap(), i64::MAX);
        assert_eq!(parse_bytes("7Ei").unwrap(), 7 << 60);
        assert_eq!(parse_cpu_millis("9E").unwrap(), i64::MAX);
        assert_eq!(Quantity::parse("9Ei").unwrap().to_string(), "9Ei");
    }

    #[test]
    fn refuses_what_does_not_fit_without_panicking() {
        for (bad, why) in [
            ("1e36", "too large"),
            ("200000000000000000000000000000000000000000", "too large"),
            ("1e2147483647", "too large"),
            ("1e9223372036854775807", "too large"),
            ("1e99999999999999999999", "bad exponent"),
            ("1e-2147483648", "more precise than a thousandth"),
            ("1e-9223372036854775808", "more precise than a thousandth"),
            (
                "1.000e-9223372036854775808",
                "more precise than a thousandth",
            ),
            (
                "1.123e-9223372036854775808",
                "more precise than a thousandth",
            ),
            ("1n", "more precise than a thousandth"),
            ("170141183460469231731687303715884105727Ei", "too large"),
            ("E", "expected a number"),
        ] {
            let e = Quantity::parse(bad).unwrap_err();
            assert!(
                e.0.starts_with(&format!("quantity {bad:?}: {why}")),
                "{bad}: {e}"
            );
        }
        assert_eq!(Quantity::parse("1e35").unwrap().millis(), 10i128.pow(38));
        assert_eq!(Quantity::MAX + Quantity::MAX, Quantity::MAX);
    }

    #[test]
    fn displays_compactly_and_round_trips() {
        for s in ["250m", "1", "128Mi", "1Gi", "3", "1500m"] {
            let q = Quantity::parse(s).unwrap();
            assert_eq!(q.to_string(), s);
            assert_eq!(Quantity::parse(&q.to_string()).unwrap(), q);
        }
        assert_eq!(Quantity::parse("1024").unwrap().to_string(), "1Ki");
    }

    #[test]
    fn orders_and_adds() {
        let a = Quantity::parse("500m").unwrap();
        let b = Quantity::parse("1").unwrap();
        assert!(a < b);
        assert_eq!((a + a), b);
        assert_eq!((a - b).millis(), 0);
    }
}
