//! Every limit and business parameter in one place, with the relations between them checked at
//! startup (`validate`). Numbers here are documented in README "Limits".

use crate::ledger::command::COINS_MAX;

/// Business rules of the wallet. Part of the deterministic state: the same commands with a
/// different `LedgerConfig` give different results, so the engine stores the config in the data
/// directory on first start and replays with the stored one.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// Coins credited per yuan topped up (Kuaishou: 10).
    pub coins_per_yuan: u64,
    /// Preset top-up packs, in fen (6, 30, 98, 198, 328, 648 yuan).
    pub topup_presets_fen: Vec<u64>,
    /// Smallest custom top-up, in fen.
    pub topup_custom_min_fen: u64,
    /// Largest custom top-up, in fen.
    pub topup_custom_max_fen: u64,
    /// How long a pending top-up waits for the channel's callback before it expires.
    pub topup_ttl_seconds: u64,
    /// The streamer's share of every tip, gift and event payment, in basis points.
    pub streamer_share_bp: u64,
    /// The union's share when the streamer belongs to a union, in basis points.
    pub union_share_bp: u64,
    /// Largest single tip / gift purchase / event payment, in coins.
    pub spend_max_coins: u64,
    /// Platform default daily spend cap per user, in coins (a user may set a lower one).
    pub daily_cap_coins: u64,
    /// Offset of the business day from UTC, in seconds (China: +8 h).
    pub day_offset_seconds: i64,
    /// Gift catalog: (gift id, price in coins).
    pub gifts: Vec<(u64, u64)>,
    /// Payment methods one user may bind.
    pub methods_per_user_max: u32,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            coins_per_yuan: 10,
            topup_presets_fen: vec![600, 3_000, 9_800, 19_800, 32_800, 64_800],
            topup_custom_min_fen: 100,
            topup_custom_max_fen: 5_000_000,
            topup_ttl_seconds: 15 * 60,
            streamer_share_bp: 5_000,
            union_share_bp: 1_000,
            spend_max_coins: 500_000,
            daily_cap_coins: 2_000_000,
            day_offset_seconds: 8 * 3600,
            gifts: vec![(1, 1), (2, 10), (3, 99), (4, 520), (5, 1_000), (6, 30_000)],
            methods_per_user_max: 8,
        }
    }
}

/// Sizes of one shard's in-memory structures. Allocated (virtually) at startup; never grown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardLimits {
    /// Accounts one shard can hold (user wallets plus a stripe of every striped account).
    pub accounts_max: u32,
    /// History entries kept in memory per shard (64 bytes each); older ones are in the log.
    pub history_max: u32,
    /// Idempotency records kept per shard (commands with ids); older ids are forgotten.
    pub ids_max: u32,
}

impl Default for ShardLimits {
    fn default() -> Self {
        ShardLimits { accounts_max: 1 << 22, history_max: 1 << 20, ids_max: 1 << 20 }
    }
}

/// Why a configuration was refused at startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "invalid configuration: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

impl LedgerConfig {
    /// Checks the relations between the parameters.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |s: &str| Err(ConfigError(s.to_string()));
        if self.coins_per_yuan == 0 || self.coins_per_yuan > 10_000 {
            return err("coins_per_yuan must be in 1..=10000");
        }
        // Checked: in a release build a wrapping sum (u64::MAX + 1 = 0) would pass and a spend
        // split would pay out more than it took.
        if self.streamer_share_bp.checked_add(self.union_share_bp).is_none_or(|sum| sum > 10_000) {
            return err("streamer_share_bp + union_share_bp must be at most 10000");
        }
        if self.topup_custom_min_fen == 0 || self.topup_custom_min_fen > self.topup_custom_max_fen {
            return err("topup_custom_min_fen must be in 1..=topup_custom_max_fen");
        }
        if self.topup_custom_max_fen > crate::ledger::amount::FEN_MAX {
            return err("topup_custom_max_fen must be at most 10000000.00 yuan");
        }
        if self.topup_presets_fen.iter().any(|&p| p == 0 || p > crate::ledger::amount::FEN_MAX) {
            return err("topup presets must be in 0.01..=10000000.00 yuan");
        }
        if self.spend_max_coins == 0 || self.spend_max_coins > COINS_MAX {
            return err("spend_max_coins must be in 1..=10^12");
        }
        if self.daily_cap_coins == 0 || self.daily_cap_coins > COINS_MAX {
            return err("daily_cap_coins must be in 1..=10^12");
        }
        if self.topup_ttl_seconds == 0 || self.topup_ttl_seconds > 7 * 86_400 {
            return err("topup_ttl_seconds must be in 1..=604800");
        }
        // `unsigned_abs`: `i64::MIN.abs()` wraps to itself (negative) in a release build.
        if self.day_offset_seconds.unsigned_abs() >= 86_400 {
            return err("day_offset_seconds must be within one day");
        }
        let mut ids: Vec<u64> = self.gifts.iter().map(|g| g.0).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.gifts.len() {
            return err("gift ids must be unique");
        }
        if self.gifts.iter().any(|&(_, price)| price == 0 || price > self.spend_max_coins) {
            return err("gift prices must be in 1..=spend_max_coins");
        }
        if self.methods_per_user_max == 0 || self.methods_per_user_max > 64 {
            return err("methods_per_user_max must be in 1..=64");
        }
        Ok(())
    }
}

impl LedgerConfig {
    /// `validate`, plus the checks a new configuration must pass that rules already stored in a
    /// data directory are not held to (they decided its log's answers, so they stay readable):
    /// every preset pack buys a whole number of coins (one that does not could never be bought:
    /// each begin of it would answer `amount_not_coin_multiple`).
    pub fn validate_new(&self) -> Result<(), ConfigError> {
        self.validate()?;
        let coins = |fen: u64| crate::ledger::amount::fen_to_coins(fen, self.coins_per_yuan);
        if let Some(&unbuyable) = self.topup_presets_fen.iter().find(|&&fen| coins(fen).is_none()) {
            return Err(ConfigError(format!(
                "the top-up pack of {} yuan is not a whole number of coins at {} coins per yuan",
                crate::ledger::amount::format_yuan(unbuyable as i64),
                self.coins_per_yuan
            )));
        }
        Ok(())
    }
}

impl ShardLimits {
    /// Checks the sizes are usable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.accounts_max < 64 || self.accounts_max > (1 << 30) {
            return Err(ConfigError("accounts_max must be in 64..=2^30 per shard".into()));
        }
        if self.history_max < 16 || self.ids_max < 16 {
            return Err(ConfigError("history_max and ids_max must be at least 16".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(config: &LedgerConfig, what: &str) {
        match config.validate() {
            Err(ConfigError(reason)) => assert!(reason.contains(what), "{reason}"),
            Ok(()) => panic!("accepted {config:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(LedgerConfig::default().validate(), Ok(()));
        assert_eq!(ShardLimits::default().validate(), Ok(()));
    }

    #[test]
    fn shares_may_not_exceed_the_whole_even_when_the_sum_wraps() {
        let with =
            |streamer, union| LedgerConfig { streamer_share_bp: streamer, union_share_bp: union, ..Default::default() };
        assert_eq!(with(10_000, 0).validate(), Ok(()));
        assert_eq!(with(0, 10_000).validate(), Ok(()));
        assert_eq!(with(9_000, 1_000).validate(), Ok(()));
        assert_eq!(with(0, 0).validate(), Ok(()));
        refused(&with(9_000, 1_001), "share_bp");
        refused(&with(10_001, 0), "share_bp");
        refused(&with(0, 10_001), "share_bp");
        // u64::MAX + 1 wraps to 0, u64::MAX + 10_001 to 10_000 (unchecked, in a release build).
        refused(&with(u64::MAX, 1), "share_bp");
        refused(&with(1, u64::MAX), "share_bp");
        refused(&with(u64::MAX, 10_001), "share_bp");
        refused(&with(u64::MAX, u64::MAX), "share_bp");
        refused(&with(u64::MAX - 9_999, 10_000), "share_bp");
    }

    #[test]
    fn a_new_configuration_may_not_offer_a_pack_no_one_can_buy() {
        let with = |presets: Vec<u64>, coins_per_yuan| LedgerConfig {
            topup_presets_fen: presets,
            coins_per_yuan,
            ..Default::default()
        };
        assert_eq!(LedgerConfig::default().validate_new(), Ok(()));
        // 0.99 yuan at 10 coins a yuan is 9.9 coins.
        let unbuyable = with(vec![600, 99], 10);
        assert_eq!(unbuyable.validate(), Ok(()), "stored rules stay readable");
        let Err(ConfigError(reason)) = unbuyable.validate_new() else { panic!("accepted") };
        assert!(reason.contains("0.99 yuan") && reason.contains("10 coins per yuan"), "{reason}");
        assert_eq!(with(vec![99, 600], 100).validate_new(), Ok(()), "99 coins at 100 a yuan");
    }

    #[test]
    fn day_offset_is_within_one_day_at_both_extremes() {
        let with = |offset| LedgerConfig { day_offset_seconds: offset, ..Default::default() };
        for ok in [0, 8 * 3600, -8 * 3600, 86_399, -86_399] {
            assert_eq!(with(ok).validate(), Ok(()), "{ok}");
        }
        // i64::MIN.abs() wraps to i64::MIN (negative, so "within one day") in a release build.
        for bad in [86_400, -86_400, i64::MAX, i64::MIN, i64::MIN + 1] {
            refused(&with(bad), "day_offset_seconds");
        }
    }
}
