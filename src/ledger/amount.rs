//! Money at the edges: yuan decimal strings <-> integer fen, and the coin conversion.
//!
//! Inside the ledger every amount is an integer in minor units (fen for money, whole coins for
//! the virtual currency). Amounts are parsed here exactly, digit by digit, with the currency's
//! scale enforced: `12.345` yuan is refused, never rounded, however many digits it has (a
//! general decimal parser rounds past its precision). `rust_decimal` is used only here, to print.

use rust_decimal::Decimal;

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
///
/// The accepted shape is plain: ASCII digits, optionally a point and more digits (`12.3400` is
/// 12.34: zeros past the second decimal are exact). Everything else is `Malformed`: exponents,
/// a `+` sign, digit separators (`1_000`, `1,000`), a bare point (`.5`, `5.`), whitespace inside.
/// A leading `-` on an otherwise well-formed amount is `NotPositive`, the clearer reason. The
/// arithmetic is checked: an amount of any length is refused with `TooLarge`, never wrapped.
pub fn parse_yuan(text: &str) -> Result<u64, AmountError> {
    let text = text.trim();
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || (unsigned.contains('.') && !all_digits(fraction)) {
        return Err(AmountError::Malformed);
    }
    let scale = YUAN_SCALE as usize;
    let (minor, beyond) = fraction.split_at(fraction.len().min(scale));
    if beyond.bytes().any(|b| b != b'0') {
        return Err(AmountError::TooManyDecimals);
    }
    // `minor` has at most `scale` digits: pad it to exactly `scale` (`5` -> 50 fen).
    let digits = minor.bytes().chain(std::iter::repeat_n(b'0', scale - minor.len()));
    let fen = whole
        .bytes()
        .chain(digits)
        .try_fold(0u64, |acc, b| acc.checked_mul(10).and_then(|acc| acc.checked_add(u64::from(b - b'0'))));
    let zero = whole.bytes().chain(minor.bytes()).all(|b| b == b'0');
    if negative || zero {
        return Err(AmountError::NotPositive);
    }
    match fen {
        Some(fen) if fen <= FEN_MAX => Ok(fen),
        _ => Err(AmountError::TooLarge),
    }
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
        assert_eq!(parse_yuan("10000000"), Ok(FEN_MAX));
        assert_eq!(parse_yuan("10000000.00"), Ok(FEN_MAX));
        assert_eq!(parse_yuan(" 30.5 "), Ok(3050));
        assert_eq!(parse_yuan("007.50"), Ok(750));
    }

    #[test]
    fn never_rounds_past_any_precision() {
        // 31 significant digits: a 28-digit decimal rounds these to 30.00 and 0.01.
        assert_eq!(parse_yuan("30.0000000000000000000000000001"), Err(AmountError::TooManyDecimals));
        assert_eq!(parse_yuan("0.00999999999999999999999999999"), Err(AmountError::TooManyDecimals));
        assert_eq!(parse_yuan("0.001"), Err(AmountError::TooManyDecimals));
        assert_eq!(parse_yuan("-0.001"), Err(AmountError::TooManyDecimals));
        // Zeros past the scale are exact, however many.
        assert_eq!(parse_yuan(&format!("30.{}", "0".repeat(40))), Ok(3000));
        assert_eq!(parse_yuan(&format!("30.01{}", "0".repeat(40))), Ok(3001));
        assert_eq!(parse_yuan(&format!("{}1.5", "0".repeat(40))), Ok(150));
        assert_eq!(parse_yuan(&format!("0.{}", "0".repeat(40))), Err(AmountError::NotPositive));
    }

    #[test]
    fn huge_amounts_are_too_large_not_a_panic() {
        assert_eq!(parse_yuan("1000000000000000000000000000"), Err(AmountError::TooLarge));
        assert_eq!(parse_yuan("79228162514264337593543950335"), Err(AmountError::TooLarge));
        assert_eq!(parse_yuan(&"9".repeat(200)), Err(AmountError::TooLarge));
        assert_eq!(parse_yuan(&format!("{}.99", "9".repeat(200))), Err(AmountError::TooLarge));
        // u64::MAX fen and one more, as yuan.
        assert_eq!(parse_yuan("184467440737095516.15"), Err(AmountError::TooLarge));
        assert_eq!(parse_yuan("184467440737095516.16"), Err(AmountError::TooLarge));
        assert_eq!(parse_yuan("-99999999999999999999999999999999"), Err(AmountError::NotPositive));
    }

    #[test]
    fn only_plain_digits_and_one_point() {
        for text in [
            "1_000", "1_000.00", "_1", "1,000", "1 000", "+5", "--5", "-", ".", ".5", "5.", "5..0", "1.2.3", "0x10",
            "1E3", "inf", "NaN", "３０", "٣", "5-", "-+5", "- 5",
        ] {
            assert_eq!(parse_yuan(text), Err(AmountError::Malformed), "{text:?}");
        }
        assert_eq!(parse_yuan("-0"), Err(AmountError::NotPositive));
        assert_eq!(parse_yuan("-0.00"), Err(AmountError::NotPositive));
        assert_eq!(parse_yuan("0.00"), Err(AmountError::NotPositive));
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
