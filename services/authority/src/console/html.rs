//! Hand-written HTML: every string that did not come from this file goes through [`esc`].
//! The pages are plain HTML with a little inline CSS and no script, so they render without a
//! build step, a CDN or anything else to fetch.

use std::fmt::Write as _;

use tollgate_proto::pb;

/// Escapes text for an HTML element body or a quoted attribute value.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// Percent-encodes text for one URL path segment or query value.
pub fn url(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

const STYLE: &str = "\
body{font:15px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}\
header{background:#1d2330;color:#fff;padding:.6em 1.2em;display:flex;gap:1.2em;align-items:center;flex-wrap:wrap}\
header a{color:#cfe0ff;text-decoration:none}header .who{margin-left:auto;font-size:.9em}\
header form{display:inline;margin:0}main{padding:1em 1.4em;max-width:1200px}\
h1{font-size:1.4em;margin:.3em 0 .6em}h2{font-size:1.1em;margin:1.4em 0 .4em}\
table{border-collapse:collapse;background:#fff;margin:.3em 0 1em;font-size:.92em}\
th,td{border:1px solid #dde1e8;padding:.3em .6em;text-align:left;vertical-align:top}\
th{background:#eef1f5}td.num{text-align:right;font-variant-numeric:tabular-nums}\
.cards{display:flex;gap:1em;flex-wrap:wrap}.card{background:#fff;border:1px solid #dde1e8;\
border-radius:6px;padding:.7em 1em;min-width:10em}.card b{display:block;font-size:1.5em}\
form.box{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:.8em 1em;margin:.5em 0 1em;max-width:46em}\
label{display:block;margin:.35em 0}input,select,textarea{font:inherit;padding:.2em .35em}\
textarea{width:100%;font-family:ui-monospace,monospace;font-size:.9em}\
button{font:inherit;padding:.3em .9em;border-radius:4px;border:1px solid #2b5cb8;background:#2f6fe0;color:#fff;cursor:pointer}\
button.danger{background:#c43d3d;border-color:#9c2b2b}a.button{margin-left:1em}\
.notice{background:#e7f6ea;border:1px solid #9fd3aa;padding:.6em 1em;border-radius:6px}\
.error{background:#fdecec;border:1px solid #eba5a5;padding:.6em 1em;border-radius:6px}\
.muted{color:#667085;font-size:.9em}pre{background:#fff;border:1px solid #dde1e8;padding:.6em;overflow:auto}\
svg{background:#fff;border:1px solid #dde1e8}.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:1em}";

/// Who is signed in, for the header.
pub struct Viewer<'a> {
    pub key_name: &'a str,
    pub can_change: bool,
    pub csrf: &'a str,
}

/// A whole console page.
pub fn page(title: &str, viewer: Option<&Viewer<'_>>, body: &str) -> String {
    let mut header = String::from("<header><strong>Tollgate console</strong>");
    if let Some(viewer) = viewer {
        header.push_str(
            "<a href=\"/console\">Home</a><a href=\"/console/prices\">Price book</a>\
             <a href=\"/console/revenue\">Revenue</a><a href=\"/console/parked\">Parked usage</a>\
             <a href=\"/console/changes\">Changes</a>",
        );
        let _ = write!(
            header,
            "<span class=\"who\">signed in as <b id=\"key-name\">{}</b> ({})</span>\
             <form method=\"post\" action=\"/console/logout\">{}<button>Sign out</button></form>",
            esc(viewer.key_name),
            if viewer.can_change {
                "admin"
            } else {
                "read only"
            },
            csrf_field(viewer.csrf),
        );
    }
    header.push_str("</header>");
    let csrf_meta = viewer
        .map(|v| format!("<meta name=\"csrf\" content=\"{}\">", esc(v.csrf)))
        .unwrap_or_default();
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">{csrf_meta}\
         <title>{} · Tollgate</title><style>{STYLE}</style></head><body>{header}<main>{body}</main></body></html>",
        esc(title)
    )
}

pub fn csrf_field(token: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(token)
    )
}

pub fn hidden(name: &str, value: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
        esc(name),
        esc(value)
    )
}

/// A table; every cell is escaped unless it is marked as markup with [`Cell::Html`].
pub enum Cell {
    Text(String),
    Num(String),
    Html(String),
}

pub fn table(headers: &[&str], rows: &[Vec<Cell>], id: &str) -> String {
    let mut out = format!("<table id=\"{}\"><thead><tr>", esc(id));
    for header in headers {
        let _ = write!(out, "<th>{}</th>", esc(header));
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            match cell {
                Cell::Text(text) => {
                    let _ = write!(out, "<td>{}</td>", esc(text));
                }
                Cell::Num(text) => {
                    let _ = write!(out, "<td class=\"num\">{}</td>", esc(text));
                }
                Cell::Html(markup) => {
                    let _ = write!(out, "<td>{markup}</td>");
                }
            }
        }
        out.push_str("</tr>");
    }
    if rows.is_empty() {
        let _ = write!(
            out,
            "<tr><td colspan=\"{}\" class=\"muted\">nothing yet</td></tr>",
            headers.len()
        );
    }
    out.push_str("</tbody></table>");
    out
}

/// An instant as people read it, in UTC; `never` when unset.
pub fn time(at: Option<&prost_types::Timestamp>) -> String {
    match at {
        Some(at) => chrono::DateTime::from_timestamp(at.seconds, 0)
            .map(|at| at.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_else(|| "(out of range)".into()),
        None => "never".into(),
    }
}

pub fn millis(at: i64) -> String {
    chrono::DateTime::from_timestamp_millis(at)
        .map(|at| at.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|| "(out of range)".into())
}

/// `GRANT_SOURCE_PROMO` → `promo`.
fn enum_word(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_lowercase()
}

pub fn grant_source(value: i32) -> String {
    pb::GrantSource::try_from(value)
        .map(|s| enum_word(s.as_str_name(), "GRANT_SOURCE_"))
        .unwrap_or_else(|_| format!("source {value}"))
}

pub fn grant_state(value: i32) -> String {
    pb::GrantState::try_from(value)
        .map(|s| enum_word(s.as_str_name(), "GRANT_STATE_"))
        .unwrap_or_else(|_| format!("state {value}"))
}

pub fn entry_kind(value: i32) -> String {
    pb::EntryKind::try_from(value)
        .map(|s| enum_word(s.as_str_name(), "ENTRY_KIND_"))
        .unwrap_or_else(|_| format!("kind {value}"))
}

pub fn price_rule(value: i32) -> String {
    pb::PriceRule::try_from(value)
        .map(|s| enum_word(s.as_str_name(), "PRICE_RULE_"))
        .unwrap_or_else(|_| format!("rule {value}"))
}

pub fn refusal_code(value: i32) -> String {
    pb::RefusalCode::try_from(value)
        .map(|s| enum_word(s.as_str_name(), "REFUSAL_CODE_"))
        .unwrap_or_else(|_| format!("code {value}"))
}

pub fn scope(scope: Option<&pb::Scope>) -> String {
    match scope {
        Some(scope) if !scope.features.is_empty() => scope.features.join(", "),
        _ => "all features".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_text_is_escaped() {
        assert_eq!(
            esc("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
        let html = table(&["a"], &[vec![Cell::Text("<b>".into())]], "t");
        assert!(html.contains("&lt;b&gt;") && !html.contains("<b>"));
    }

    #[test]
    fn urls_encode_everything_but_unreserved_characters() {
        assert_eq!(url("acme:team 1/x"), "acme%3Ateam%201%2Fx");
    }
}
