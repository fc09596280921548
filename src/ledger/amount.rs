//! Money at the edges: yuan decimal strings <-> integer fen, and the coin conversion.
//!
//! Inside the ledger every amount is an integer in minor units (fen for money, whole coins for
//! the virtual currency). `rust_decimal` is used only here, to parse and print, with the
//! currency's scale enforced: `12.345` yuan is refused, never rounded.

use rust_decimal::Decimal;
use std::str::FromStr;

/// Decimal places of the yuan (1 yuan = 100 fen).
pub const YUAN_SCALE: u32 = 2;
/// Largest amount of money accepted in one command, in fen (10 million yuan): far above any
/// real top-up, far below overflow of any sum the ledger computes.
pub const FEN_MAX: u64 = 1_000_000_000;

/// Why an amount string was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AmountError {
    /// Not a decimal number.
    Malformed,
    /// More decimal places than the currency has.
    TooManyDecimals,
    /// Zero or negative.
    NotPositive,
    /// Larger than `FEN_MAX`.
    TooLarge,
}

impl core::fmt::Display for AmountError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            AmountError::Malformed => "not a decimal amount",
            AmountError::TooManyDecimals => "more than 2 decimal places (the yuan has 2)",
            AmountError::NotPositive => "the amount must be greater than zero",
            AmountError::TooLarge => "the amount is larger than 10000000.00",
        })
    }
}

impl std::error::Error for AmountError {}

/// Parses a yuan amount (`"30"`, `"30.5"`, `"30.00"`) into fen.
pub fn parse_yuan(text: &str) -> Result<u64, AmountError> {
    let text = text.trim();
    if text.is_empty() || text.contains(['e', 'E']) {
        return Err(AmountError::Malformed);
    }
    let value = Decimal::from_str(text).map_err(|_| AmountError::Malformed)?;
    let value = value.normalize();
    if value.scale() > YUAN_SCALE {
        return Err(AmountError::TooManyDecimals);
    }
    if value <= Decimal::ZERO {
        return Err(AmountError::NotPositive);
    }
    let fen = value * Decimal::from(100u32);
    let fen: u64 = fen.trunc().try_into().map_err(|_| AmountError::TooLarge)?;
    if fen > FEN_MAX {
        return Err(AmountError::TooLarge);
    }
    Ok(fen)
}

/// Formats fen as a yuan string with exactly two decimals (`3000` -> `"30.00"`).
pub fn format_yuan(fen: i64) -> String {
    Decimal::new(fen, YUAN_SCALE).to_string()
}

/// Coins bought by `fen` at `coins_per_yuan`; `None` if it is not a whole number of coins.
pub fn fen_to_coins(fen: u64, coins_per_yuan: u64) -> Option<u64> {
    let scaled = fen.checked_mul(coins_per_yuan)?;
    if !scaled.is_multiple_of(100) {
        return None;
    }
    Some(scaled / 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_enforces_scale() {
        assert_eq!(parse_yuan("30"), Ok(3000));
        assert_eq!(parse_yuan("30.00"), Ok(3000));
        assert_eq!(parse_yuan("0.01"), Ok(1));
        assert_eq!(parse_yuan("6.5"), Ok(650));
        assert_eq!(parse_yuan("12.345"), Err(AmountError::TooManyDecimals));
        assert_eq!(parse_yuan("12.3400"), Ok(1234));
        assert_eq!(parse_yuan("0"), Err(AmountError::NotPositive));
        assert_eq!(parse_yuan("-5"), Err(AmountError::NotPositive));
        assert_eq!(parse_yuan("abc"), Err(AmountError::Malformed));
        assert_eq!(parse_yuan("1e3"), Err(AmountError::Malformed));
        assert_eq!(parse_yuan(""), Err(AmountError::Malformed));
        assert_eq!(parse_yuan("10000000.01"), Err(AmountError::TooLarge));
        assert_eq!(parse_yuan("99999999999999999999999"), Err(AmountError::TooLarge));
    }

    #[test]
    fn formats_and_converts() {
        assert_eq!(format_yuan(3000), "30.00");
        assert_eq!(format_yuan(1), "0.01");
        assert_eq!(fen_to_coins(600, 10), Some(60));
        assert_eq!(fen_to_coins(605, 10), None);
        assert_eq!(fen_to_coins(610, 10), Some(61));
    }
}
