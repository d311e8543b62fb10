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
const DECIMAL: &[(&str, i32)] = &[
    ("m", -3),
    ("k", 3),
    ("M", 6),
    ("G", 9),
    ("T", 12),
    ("P", 15),
    ("E", 18),
];

impl Quantity {
    pub fn parse(s: &str) -> Result<Self, QuantityError> {
        let err = |why: String| QuantityError(format!("quantity {s:?}: {why}"));
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
        let digits = format!("{int_part}{frac_part}");
        let mantissa: i128 = digits
            .parse()
            .map_err(|_| err("the number is too large".into()))?;
        // value = mantissa × 10^(exp10 − frac digits) × 2^exp2
        let mut exp10: i32 = -(frac_part.len() as i32);
        let mut exp2: u32 = 0;
        match suffix {
            "" => {}
            s if s.starts_with(['e', 'E']) => {
                let e: i32 = s[1..]
                    .parse()
                    .map_err(|_| err(format!("bad exponent {s:?}")))?;
                exp10 += e;
            }
            s => {
                if let Some((_, p)) = BINARY.iter().find(|(n, _)| *n == s) {
                    exp2 = *p;
                } else if let Some((_, p)) = DECIMAL.iter().find(|(n, _)| *n == s) {
                    exp10 += p;
                } else {
                    return Err(err(format!("unknown suffix {s:?}")));
                }
            }
        }
        // In thousandths.
        exp10 += 3;
        let mut v = mantissa;
        if exp10 >= 0 {
            for _ in 0..exp10 {
                v = v.checked_mul(10).ok_or_else(|| err("too large".into()))?;
            }
        } else {
            let div = 10i128
                .checked_pow((-exp10) as u32)
                .ok_or_else(|| err("too precise".into()))?;
            if v % div != 0 {
                return Err(err("more precise than a thousandth of a unit".into()));
            }
            v /= div;
        }
        let v = v
            .checked_mul(1i128 << exp2)
            .ok_or_else(|| err("too large".into()))?;
        if v > i64::MAX as i128 * 1000 {
            return Err(err("too large".into()));
        }
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
        (self.0 + 999) / 1000
    }
}

/// Millicores of a cpu quantity.
pub fn parse_cpu_millis(s: &str) -> Result<i64, QuantityError> {
    Ok(Quantity::parse(s)?.millis() as i64)
}

/// Bytes of a memory quantity (rounded up to a whole byte).
pub fn parse_bytes(s: &str) -> Result<i64, QuantityError> {
    Ok(Quantity::parse(s)?.value_ceil() as i64)
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
