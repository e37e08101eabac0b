//! The price book editor's text: one version as TOML (or JSON, when it starts with `{`), in
//! the layout the `tollgate prices publish` file uses:
//!
//! ```toml
//! version = 2
//! effective_from = "2026-01-01T00:00:00Z"
//! audience = "all_accounts"          # or new_accounts
//! [default_rates]
//! chat = "0.5"
//! [region_rates.eu-west-1]
//! chat = "0.4"
//! [plan_rates.pro]
//! chat = "0.3"
//! [plan_region_rates."pro/eu-west-1"]
//! chat = "0.25"
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;

use tollgate_core::Timestamp;
use tollgate_proto::pb;

use crate::lifecycle::Problems;

/// Longest editor text accepted, in bytes.
pub const TEXT_BYTES_MAX: usize = 256 * 1024;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionText {
    version: u64,
    effective_from: String,
    audience: Option<String>,
    #[serde(default)]
    default_rates: BTreeMap<String, String>,
    #[serde(default)]
    region_rates: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    plan_rates: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    plan_region_rates: BTreeMap<String, BTreeMap<String, String>>,
}

/// The version the text describes, or every problem found in it. Rates are not checked here:
/// the Admin service's own decoding does that, naming each.
pub fn parse(text: &str) -> Result<pb::PriceBookVersion, Problems> {
    if text.len() > TEXT_BYTES_MAX {
        return Err(vec![(
            "price book".into(),
            format!("{} bytes, at most {TEXT_BYTES_MAX}", text.len()),
        )]);
    }
    let parsed: VersionText = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| vec![("price book (JSON)".into(), e.to_string())])?
    } else {
        toml::from_str(text).map_err(|e| {
            vec![(
                "price book (TOML)".into(),
                e.to_string().trim_end().to_owned(),
            )]
        })?
    };
    let mut problems = Problems::new();
    if parsed.version == 0 {
        problems.push(("version".into(), "must be more than zero".into()));
    }
    let effective_from = match Timestamp::parse_rfc3339(parsed.effective_from.trim()) {
        Ok(at) => Some(tollgate_proto::decode::timestamp_to_pb(at)),
        Err(_) => {
            problems.push((
                "effective_from".into(),
                format!(
                    "{:?} is not an RFC 3339 time like 2026-01-01T00:00:00Z",
                    parsed.effective_from
                ),
            ));
            None
        }
    };
    let audience = match parsed.audience.as_deref() {
        None | Some("all_accounts") => pb::Audience::AllAccounts,
        Some("new_accounts") => pb::Audience::NewAccounts,
        Some(other) => {
            problems.push((
                "audience".into(),
                format!("{other:?} is not all_accounts or new_accounts"),
            ));
            pb::Audience::AllAccounts
        }
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let tables = |tables: BTreeMap<String, BTreeMap<String, String>>| {
        tables
            .into_iter()
            .map(|(name, rates)| (name, table(rates)))
            .collect()
    };
    Ok(pb::PriceBookVersion {
        version: parsed.version,
        effective_from,
        audience: audience.into(),
        default_rates: Some(table(parsed.default_rates)),
        region_rates: tables(parsed.region_rates),
        plan_rates: tables(parsed.plan_rates),
        plan_region_rates: tables(parsed.plan_region_rates),
    })
}

fn table(rates: BTreeMap<String, String>) -> pb::RateTable {
    pb::RateTable {
        rates: rates.into_iter().collect(),
    }
}

/// A version as editor text (TOML), with `version` and `effective_from` replaced when given.
pub fn to_text(
    version: &pb::PriceBookVersion,
    number: Option<u64>,
    effective_from: Option<&str>,
) -> String {
    let quote = |text: &str| toml::Value::String(text.to_owned()).to_string();
    let mut out = String::new();
    let _ = writeln!(out, "version = {}", number.unwrap_or(version.version));
    let from = match effective_from {
        Some(from) => from.to_owned(),
        None => version
            .effective_from
            .as_ref()
            .and_then(|at| chrono::DateTime::from_timestamp(at.seconds, 0))
            .map(|at| at.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_default(),
    };
    let _ = writeln!(out, "effective_from = {}", quote(&from));
    let audience = if version.audience == i32::from(pb::Audience::NewAccounts) {
        "new_accounts"
    } else {
        "all_accounts"
    };
    let _ = writeln!(out, "audience = {}", quote(audience));
    let write_table = |out: &mut String, header: String, table: &pb::RateTable| {
        let _ = writeln!(out, "\n[{header}]");
        let sorted: BTreeMap<&String, &String> = table.rates.iter().collect();
        for (feature, rate) in sorted {
            let _ = writeln!(out, "{} = {}", quote_key(feature), quote(rate));
        }
    };
    write_table(
        &mut out,
        "default_rates".into(),
        version
            .default_rates
            .as_ref()
            .unwrap_or(&pb::RateTable::default()),
    );
    for (section, tables) in [
        ("region_rates", &version.region_rates),
        ("plan_rates", &version.plan_rates),
        ("plan_region_rates", &version.plan_region_rates),
    ] {
        let sorted: BTreeMap<&String, &pb::RateTable> = tables.iter().collect();
        for (name, table) in sorted {
            write_table(&mut out, format!("{section}.{}", quote_key(name)), table);
        }
    }
    out
}

/// A TOML key: bare when it can be, quoted otherwise.
fn quote_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        key.to_owned()
    } else {
        toml::Value::String(key.to_owned()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_survives_text_and_back() {
        let text = "version = 3\neffective_from = \"2026-01-01T00:00:00Z\"\n\
                    [default_rates]\nchat = \"0.5\"\n[plan_region_rates.\"pro/eu\"]\nchat = \"0.2\"\n";
        let version = parse(text).unwrap();
        assert_eq!(version.version, 3);
        let again = parse(&to_text(&version, None, None)).unwrap();
        assert_eq!(again, version);
        let json = "{\"version\":3,\"effective_from\":\"2026-01-01T00:00:00Z\",\
                    \"default_rates\":{\"chat\":\"0.5\"},\"plan_region_rates\":{\"pro/eu\":{\"chat\":\"0.2\"}}}";
        assert_eq!(parse(json).unwrap(), version);
    }

    #[test]
    fn every_problem_of_the_frame_is_named() {
        let problems =
            parse("version = 0\neffective_from = \"soon\"\naudience = \"some\"\n").unwrap_err();
        let fields: Vec<&str> = problems.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["version", "effective_from", "audience"]);
        let problems = parse("version = 1\nprices = 2\n").unwrap_err();
        assert!(problems[0].1.contains("prices"), "{problems:?}");
    }
}
