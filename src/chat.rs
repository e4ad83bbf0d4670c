//! Chat prompts: a checkpoint's Jinja chat template rendered the way HF transformers renders
//! it (trim_blocks, lstrip_blocks, loop controls, Python string methods, `raise_exception`,
//! `strftime_now`, a Python-style `tojson`), and the plain base-model prompt of the hybrid
//! method (spec §3).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The base model's prompt in the hybrid method: a fixed instruction, the question, and an
/// answer cue (spec §3, verbatim).
pub fn plain_base_prompt(question: &str) -> String {
    format!(
        "Task: Answer the question below. Explain your reasoning step by step.\n\n\n\n\
         Question:\n{question}\n\nStep by step answer:\n"
    )
}

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// "system", "user" or "assistant".
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }

    pub fn system(content: &str) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: &str) -> Self {
        Self::new("user", content)
    }

    pub fn assistant(content: &str) -> Self {
        Self::new("assistant", content)
    }
}

/// A message as the template sees it: a map whose keys iterate in Python's insertion order
/// (role, content), so `message | tojson` and `message.items()` match HF. (Serialising the
/// struct would give minijinja's sorted map instead.)
#[derive(Debug)]
struct MessageObject(Message);

impl Object for MessageObject {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.0.role.as_str())),
            "content" => Some(Value::from(self.0.content.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// Name under which the template is compiled; it has no extension so that minijinja never
/// turns on HTML auto-escaping (HF renders without escaping).
const TEMPLATE_NAME: &str = "chat_template";

/// Prefix of the error detail produced by `raise_exception`, so `render` can report the
/// template's own message.
const RAISE_TAG: &str = "raise_exception: ";

/// A compiled chat template plus the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, for error messages.
    origin: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// Load the chat template of a checkpoint folder: `chat_template.jinja` when present, else
    /// the `chat_template` key of `tokenizer_config.json` (a string, or a list of
    /// `{name, template}` objects of which "default" is used). bos/eos come from
    /// `tokenizer_config.json`. Ok(None) when the checkpoint has no template.
    pub fn from_dir(dir: &Path) -> Result<Option<ChatTemplate>> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Option<serde_json::Value> = if config_path.is_file() {
            let text = crate::files::read_text(&config_path)?;
            Some(serde_json::from_str(&text).map_err(|e| {
                Error::Input(format!(
                    "{}: expected a JSON object, found invalid JSON: {e}",
                    config_path.display()
                ))
            })?)
        } else {
            None
        };
        let token = |key: &str| -> Result<Option<String>> {
            match config.as_ref().and_then(|c| c.get(key)) {
                None => Ok(None),
                Some(v) => special_token(v).map_err(|found| {
                    Error::Input(format!(
                        "{}: expected `{key}` to be a string, an object with \"content\", or \
                         null; found {found}",
                        config_path.display()
                    ))
                }),
            }
        };
        let bos = token("bos_token")?;
        let eos = token("eos_token")?;

        let jinja_path = dir.join("chat_template.jinja");
        let (source, origin) = if jinja_path.is_file() {
            let text = crate::files::read_text(&jinja_path)?;
            (text, jinja_path.display().to_string())
        } else {
            let origin = format!("{} (chat_template)", config_path.display());
            match config.as_ref().and_then(|c| c.get("chat_template")) {
                None | Some(serde_json::Value::Null) => return Ok(None),
                Some(v) => (template_from_config(v, &origin)?, origin),
            }
        };
        Self::compile(source, origin, bos, eos).map(Some)
    }

    /// Compile a template given as text (e.g. from the command line or a test).
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<ChatTemplate> {
        Self::compile(
            source.to_string(),
            "chat template".to_string(),
            bos_token.map(str::to_string),
            eos_token.map(str::to_string),
        )
    }

    fn compile(
        source: String,
        origin: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        // HF's settings: block tags eat their newline and leading indentation; a single trailing
        // newline of the template is dropped.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source).map_err(|e| {
            Error::Input(format!(
                "{origin}: expected a valid Jinja chat template, found a syntax error: {e}"
            ))
        })?;
        Ok(ChatTemplate {
            env,
            origin,
            bos_token,
            eos_token,
        })
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Render a conversation. With `add_generation_prompt` the text ends with the assistant
    /// header the model should continue from. Template errors (including the template's own
    /// `raise_exception`) are `Error::Input`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| Value::from_object(MessageObject(m.clone())))
            .collect();
        ctx.insert("messages", Value::from(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        // HF passes these explicitly as None, so `tools is defined` is true but falsy.
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        if let Some(b) = &self.bos_token {
            ctx.insert("bos_token", Value::from(b.as_str()));
        }
        if let Some(e) = &self.eos_token {
            ctx.insert("eos_token", Value::from(e.as_str()));
        }
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::Input(format!("{}: {e}", self.origin)))?;
        tmpl.render(ctx).map_err(|e| match e.detail() {
            Some(d) if e.kind() == ErrorKind::InvalidOperation && d.starts_with(RAISE_TAG) => {
                Error::Input(format!(
                    "{}: the chat template raised an exception: {}",
                    self.origin,
                    &d[RAISE_TAG.len()..]
                ))
            }
            _ => Error::Input(format!("{}: rendering failed: {e}", self.origin)),
        })
    }
}

/// bos/eos in tokenizer_config.json: a plain string, an AddedToken object, or null.
/// Err carries a short description of what was found instead.
fn special_token(v: &serde_json::Value) -> std::result::Result<Option<String>, String> {
    match v {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => Ok(Some(s.clone())),
        serde_json::Value::Object(o) => match o.get("content") {
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            _ => Err("an object without a string \"content\"".to_string()),
        },
        other => Err(format!("{other}")),
    }
}

/// The `chat_template` value of tokenizer_config.json: a string or a named list.
fn template_from_config(v: &serde_json::Value, origin: &str) -> Result<String> {
    match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Array(items) => {
            let mut names = Vec::new();
            for item in items {
                let name = item.get("name").and_then(|n| n.as_str());
                let template = item.get("template").and_then(|t| t.as_str());
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(t.to_string()),
                    (Some(n), Some(_)) => names.push(n.to_string()),
                    _ => crate::bail!(
                        "{origin}: expected list entries {{\"name\": string, \"template\": string}}, \
                         found {item}"
                    ),
                }
            }
            crate::bail!(
                "{origin}: expected a template named \"default\" in the list, found only {names:?}"
            )
        }
        other => {
            crate::bail!("{origin}: expected a string or a list of named templates, found {other}")
        }
    }
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISE_TAG}{msg}"),
    ))
}

/// `strftime_now(fmt)`: the current time (UTC; Python's version uses local time) formatted
/// with the strftime codes chat templates use.
fn strftime_now(fmt: String) -> std::result::Result<Value, minijinja::Error> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&fmt, secs)
        .map(Value::from)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// Proleptic Gregorian (year, month 1..=12, day 1..=31) of a day count since 1970-01-01.
/// Works in 400-year eras (146,097 days each) counted from 0000-03-01, so that the leap day
/// is the last day of each shifted year.
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era, 0..399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of shifted year, 0..365
    let mp = (5 * doy + 2) / 153; // month with March = 0
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Inverse of `civil_from_days`: days since 1970-01-01 of a proleptic Gregorian date.
pub(crate) fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = year - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((month + 9) % 12); // March = 0
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Format Unix time `secs` (UTC) with strftime codes %d %e %m %y %Y %b %B %a %A %H %M %S %j %%.
pub(crate) fn strftime(fmt: &str, secs: i64) -> std::result::Result<String, String> {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let wday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out += &format!("{d:02}"),
            Some('e') => out += &format!("{d:>2}"),
            Some('m') => out += &format!("{m:02}"),
            Some('y') => out += &format!("{:02}", y.rem_euclid(100)),
            Some('Y') => out += &y.to_string(),
            Some('b') => out += &MONTHS[m as usize - 1][..3],
            Some('B') => out += MONTHS[m as usize - 1],
            Some('a') => out += &WEEKDAYS[wday][..3],
            Some('A') => out += WEEKDAYS[wday],
            Some('H') => out += &format!("{:02}", sod / 3600),
            Some('M') => out += &format!("{:02}", sod / 60 % 60),
            Some('S') => out += &format!("{:02}", sod % 60),
            Some('j') => out += &format!("{yday:03}"),
            Some('%') => out.push('%'),
            Some(other) => {
                return Err(format!(
                    "strftime_now: expected one of %d %e %m %y %Y %b %B %a %A %H %M %S %j %%, \
                     found %{other}"
                ))
            }
            None => return Err("strftime_now: format ends with a lone %".to_string()),
        }
    }
    Ok(out)
}

/// HF's `tojson`: Python `json.dumps(x, ensure_ascii=False, indent=indent)`, i.e. ", " and
/// ": " separators without indent, "," and newlines with it, and no HTML escaping (minijinja's
/// own `tojson` escapes `<`, `>` and `&`). Map keys come out in minijinja's map order.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // Accepted for compatibility; output is always non-ASCII-preserving and unsorted.
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    v: &Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                let f = f64::try_from(v.clone())?;
                let s = if f.is_nan() {
                    "NaN".to_string()
                } else if f.is_infinite() {
                    if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string()
                } else if f.fract() == 0.0 && f.abs() < 1e16 {
                    format!("{f:.1}")
                } else {
                    format!("{f}")
                };
                out.push_str(&s);
            }
        }
        ValueKind::String => {
            let s = v.as_str().unwrap_or_default();
            out.push_str(&serde_json::to_string(s).unwrap_or_default());
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(item, indent, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                let key = match k.as_str() {
                    Some(s) => s.to_string(),
                    None => k.to_string(),
                };
                out.push_str(&serde_json::to_string(&key).unwrap_or_default());
                out.push_str(": ");
                write_json(&v.get_item(k)?, indent, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialise a {} value", v.kind()),
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_930), (2024, 7, 26));
        assert_eq!(civil_from_days(20_453), (2025, 12, 31));
        for d in [-800_000i64, -1, 0, 59, 11_016, 19_930, 2_000_000] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d, "round trip of day {d}");
        }
    }

    #[test]
    fn strftime_formats_llama_codes() {
        // 2024-07-26 13:05:09 UTC, a Friday, day 208 of a leap year.
        let t = 19_930 * 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(strftime("%d %b %Y", t).unwrap(), "26 Jul 2024");
        assert_eq!(
            strftime("%A %a %B %m/%d/%y %H:%M:%S %j %%", t).unwrap(),
            "Friday Fri July 07/26/24 13:05:09 208 %"
        );
        assert_eq!(strftime("%e", 0).unwrap(), " 1");
        assert!(strftime("%Q", t).is_err());
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t2 = ChatTemplate::new(
            "{% set x = {'a': [1, 2.5, none, true], 'b': 'é\"'} %}{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ 'a<b' | tojson }}|{{ [] | tojson }}",
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            t2.render(&[], false).unwrap(),
            "{\"a\": [1, 2.5, null, true], \"b\": \"é\\\"\"}|{\n  \"a\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"b\": \"é\\\"\"\n}|\"a<b\"|[]"
        );
    }

    #[test]
    fn plain_base_prompt_is_spec_string() {
        assert_eq!(
            plain_base_prompt("What is 2+2?"),
            "Task: Answer the question below. Explain your reasoning step by step.\n\n\n\nQuestion:\nWhat is 2+2?\n\nStep by step answer:\n"
        );
    }
}
