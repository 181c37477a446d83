//! Amounts in integer minor units of an ISO 4217 currency: never floats.

use std::fmt;

/// A validated amount: non-negative minor units and a lowercase three-letter currency code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Money {
    amount_minor: i64,
    currency: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("amount must not be negative (got {0})")]
    Negative(i64),
    #[error("currency must be a three-letter ISO 4217 code (got '{0}')")]
    BadCurrency(String),
}

impl Money {
    pub fn new(amount_minor: i64, currency: &str) -> Result<Self, MoneyError> {
        if amount_minor < 0 {
            return Err(MoneyError::Negative(amount_minor));
        }
        let currency = currency.to_ascii_lowercase();
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(MoneyError::BadCurrency(currency));
        }
        Ok(Money { amount_minor, currency })
    }

    pub fn amount_minor(&self) -> i64 {
        self.amount_minor
    }

    pub fn currency(&self) -> &str {
        &self.currency
    }
}

impl TryFrom<&astria_models::Money> for Money {
    type Error = MoneyError;
    fn try_from(m: &astria_models::Money) -> Result<Self, MoneyError> {
        Money::new(m.amount_minor, &m.currency)
    }
}

impl From<&Money> for astria_models::Money {
    fn from(m: &Money) -> Self {
        astria_models::Money { amount_minor: m.amount_minor, currency: m.currency.clone() }
    }
}

impl fmt::Display for Money {
    /// `19.99 USD` for two-decimal currencies; zero-decimal ones (JPY, KRW, ...) have none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const ZERO_DECIMAL: &[&str] = &[
            "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof",
            "xpf",
        ];
        let code = self.currency.to_ascii_uppercase();
        if ZERO_DECIMAL.contains(&self.currency.as_str()) {
            write!(f, "{} {code}", self.amount_minor)
        } else {
            write!(f, "{}.{:02} {code}", self.amount_minor / 100, self.amount_minor % 100)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_amounts_are_normalised_to_lowercase_currency() {
        let m = Money::new(1999, "USD").unwrap();
        assert_eq!((m.amount_minor(), m.currency()), (1999, "usd"));
        assert_eq!(m.to_string(), "19.99 USD");
        assert_eq!(Money::new(500, "jpy").unwrap().to_string(), "500 JPY");
    }

    #[test]
    fn negative_amounts_and_bad_currencies_are_refused() {
        assert_eq!(Money::new(-1, "usd"), Err(MoneyError::Negative(-1)));
        for bad in ["", "us", "usdd", "u$d", "12a"] {
            assert!(matches!(Money::new(1, bad), Err(MoneyError::BadCurrency(_))), "{bad}");
        }
    }
}
