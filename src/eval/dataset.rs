//! Loading an evaluation set from JSONL: GSM8K (`question`, `answer` ending in `#### N`),
//! MATH-500 (`problem`, `answer`, `subject`, `level`) or any JSONL with named fields.
//! Every row is checked, so a bad line is reported even when `--offset`/`--limit` skip it.

use std::path::Path;
use std::str::FromStr;

use crate::bail;
use crate::error::{Error, Result};

/// Which evaluation set a file holds; decides the default field names and the reference format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetKind {
    Gsm8k,
    Math500,
    Custom,
}

impl DatasetKind {
    /// The default (question, answer) field names.
    pub fn default_fields(self) -> (&'static str, &'static str) {
        match self {
            DatasetKind::Gsm8k | DatasetKind::Custom => ("question", "answer"),
            DatasetKind::Math500 => ("problem", "answer"),
        }
    }

    /// The grading rules a set uses by default (a custom set is graded as MATH unless told).
    pub fn default_grade_kind(self) -> super::grade::GradeKind {
        match self {
            DatasetKind::Gsm8k => super::grade::GradeKind::Gsm8k,
            DatasetKind::Math500 | DatasetKind::Custom => super::grade::GradeKind::Math,
        }
    }
}

impl FromStr for DatasetKind {
    type Err = Error;
    /// `gsm8k`, `math500` (or `math`), `custom`.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "gsm8k" => Ok(DatasetKind::Gsm8k),
            "math500" | "math" | "math-500" => Ok(DatasetKind::Math500),
            "custom" => Ok(DatasetKind::Custom),
            other => Err(Error::Input(format!(
                "dataset kind: expected gsm8k, math500 or custom, found {other:?}"
            ))),
        }
    }
}

/// One evaluation problem.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Problem {
    /// 0-based row index in the file (blank lines not counted), stable across offset/limit.
    pub index: usize,
    pub question: String,
    /// The reference answer (GSM8K: the text after the final `#### `, commas removed).
    pub answer: String,
    /// Every other field of the row (MATH: `subject`, `level`, `solution`, `unique_id`).
    pub meta: serde_json::Map<String, serde_json::Value>,
}

/// Loads rows `offset..offset+limit` of a JSONL evaluation set.
pub fn load_dataset(
    path: &Path,
    kind: DatasetKind,
    question_field: Option<&str>,
    answer_field: Option<&str>,
    offset: usize,
    limit: Option<usize>,
) -> Result<Vec<Problem>> {
    let (dq, da) = kind.default_fields();
    let qf = question_field.unwrap_or(dq);
    let af = answer_field.unwrap_or(da);
    let name = path.display();
    let mut all = Vec::new();
    for (lineno, mut row) in read_rows(path)? {
        let present: Vec<String> = row.keys().cloned().collect();
        for field in [qf, af] {
            if !row.contains_key(field) {
                bail!(
                    "{name}:{lineno}: expected field {field:?}, found only fields [{}]",
                    present.join(", ")
                );
            }
        }
        let question = take_text(&mut row, qf, &name, lineno)?;
        let raw_answer = take_text(&mut row, af, &name, lineno)?;
        let answer = match kind {
            DatasetKind::Gsm8k => gsm8k_reference(&raw_answer).ok_or_else(|| {
                Error::Input(format!(
                    "{name}:{lineno}: expected field {af:?} to end in \"#### <number>\", found no \"####\""
                ))
            })?,
            _ => raw_answer.trim().to_string(),
        };
        all.push(Problem {
            index: all.len(),
            question,
            answer,
            meta: row,
        });
    }
    if all.is_empty() {
        bail!("{name}: expected at least one JSONL row, found an empty dataset");
    }
    let total = all.len();
    let picked: Vec<Problem> = all
        .into_iter()
        .skip(offset)
        .take(limit.unwrap_or(usize::MAX))
        .collect();
    if picked.is_empty() {
        bail!(
            "{name}: offset {offset} and limit {} select no problems of the {total} rows",
            limit.map_or("none".to_string(), |l| l.to_string())
        );
    }
    Ok(picked)
}

/// Reads every non-blank line of a JSONL file as a JSON object, with its 1-based line number.
fn read_rows(path: &Path) -> Result<Vec<(usize, serde_json::Map<String, serde_json::Value>)>> {
    let text = crate::files::read_text(path)?;
    let name = path.display();
    let mut rows = Vec::new();
    for (lineno, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l)) {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            Error::Input(format!(
                "{name}:{lineno}: expected one JSON object per line, found malformed JSON ({e})"
            ))
        })?;
        let serde_json::Value::Object(row) = value else {
            bail!(
                "{name}:{lineno}: expected a JSON object, found {}",
                json_type(&value)
            );
        };
        rows.push((lineno, row));
    }
    Ok(rows)
}

/// The questions of a JSONL file (no answers needed), from `field`, or from `question` or
/// `problem` when no field is named.
pub fn load_questions(path: &Path, field: Option<&str>) -> Result<Vec<String>> {
    let name = path.display();
    let mut out = Vec::new();
    // Without --question-field, the first row decides: "question", else "problem".
    let mut field = field.map(str::to_string);
    for (lineno, mut row) in read_rows(path)? {
        let f = field
            .get_or_insert_with(|| {
                if row.contains_key("question") {
                    "question".into()
                } else {
                    "problem".into()
                }
            })
            .clone();
        if !row.contains_key(&f) {
            let present: Vec<String> = row.keys().cloned().collect();
            bail!(
                "{name}:{lineno}: expected field {f:?}, found only fields [{}]",
                present.join(", ")
            );
        }
        let q = take_text(&mut row, &f, &name, lineno)?;
        if q.trim().is_empty() {
            bail!("{name}:{lineno}: expected a question in field {f:?}, found an empty one");
        }
        out.push(q);
    }
    if out.is_empty() {
        bail!("{name}: expected at least one JSONL row, found an empty file");
    }
    Ok(out)
}

/// The GSM8K reference: the text after the final `#### `, without thousands commas.
fn gsm8k_reference(answer: &str) -> Option<String> {
    let at = answer.rfind("####")?;
    Some(answer[at + 4..].trim().replace(',', ""))
}

/// Removes and returns a text field; numbers are accepted and written as text.
fn take_text(
    row: &mut serde_json::Map<String, serde_json::Value>,
    field: &str,
    name: &std::path::Display,
    lineno: usize,
) -> Result<String> {
    match row.remove(field) {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
        Some(other) => bail!(
            "{name}:{lineno}: expected field {field:?} to be a string, found {}",
            json_type(&other)
        ),
        None => bail!("{name}:{lineno}: expected field {field:?}, found none"),
    }
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, body: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("thinksteer-dataset-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn gsm8k_rows_offset_limit() {
        let p = write(
            "g.jsonl",
            "{\"question\":\"q0\",\"answer\":\"a\\n#### 1,450\"}\n\n{\"question\":\"q1\",\"answer\":\"#### -3\"}\n{\"question\":\"q2\",\"answer\":\"#### 7\"}\n",
        );
        let all = load_dataset(&p, DatasetKind::Gsm8k, None, None, 0, None).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].answer, "1450");
        let some = load_dataset(&p, DatasetKind::Gsm8k, None, None, 1, Some(1)).unwrap();
        assert_eq!((some[0].index, some[0].answer.as_str()), (1, "-3"));
        let e = load_dataset(&p, DatasetKind::Gsm8k, None, None, 3, None).unwrap_err();
        assert!(e.to_string().contains("select no problems"), "{e}");
    }

    #[test]
    fn questions_keep_the_first_rows_field_and_refuse_empty_ones() {
        let p = write("q.jsonl", "{\"question\":\"a\"}\n{\"problem\":\"b\"}\n");
        let e = load_questions(&p, None).unwrap_err().to_string();
        assert!(e.contains(":2: expected field \"question\""), "{e}");
        let p = write("e.jsonl", "{\"question\":\"a\"}\n{\"question\":\" \"}\n");
        let e = load_questions(&p, None).unwrap_err().to_string();
        assert!(e.contains(":2: expected a question"), "{e}");
        let p = write("p.jsonl", "{\"problem\":\"a\"}\n{\"problem\":5}\n");
        assert_eq!(load_questions(&p, None).unwrap(), ["a", "5"]);
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_first_row() {
        let p = write(
            "bom.jsonl",
            "\u{feff}{\"question\":\"q\",\"answer\":\"#### 1\"}\r\n",
        );
        let rows = load_dataset(&p, DatasetKind::Gsm8k, None, None, 0, None).unwrap();
        assert_eq!(
            (rows[0].question.as_str(), rows[0].answer.as_str()),
            ("q", "1")
        );
        assert_eq!(load_questions(&p, None).unwrap(), ["q"]);
    }

    #[test]
    fn custom_fields_and_meta() {
        let p = write(
            "c.jsonl",
            "{\"prompt\":\"2+2?\",\"gold\":4,\"level\":\"Level 1\"}\n",
        );
        let rows = load_dataset(
            &p,
            DatasetKind::Custom,
            Some("prompt"),
            Some("gold"),
            0,
            None,
        )
        .unwrap();
        assert_eq!(rows[0].answer, "4");
        assert_eq!(rows[0].meta["level"], "Level 1");
        assert!(!rows[0].meta.contains_key("gold"));
    }

    #[test]
    fn errors_name_line_and_field() {
        let p = write(
            "bad.jsonl",
            "{\"question\":\"q\",\"answer\":\"#### 1\"}\n{\"question\": oops}\n",
        );
        let e = load_dataset(&p, DatasetKind::Gsm8k, None, None, 0, Some(1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bad.jsonl:2") && e.contains("malformed JSON"),
            "{e}"
        );
        assert!(!e.contains('\n'));
        let p = write(
            "miss.jsonl",
            "{\"problem\":\"q\",\"subject\":\"Algebra\"}\n",
        );
        let e = load_dataset(&p, DatasetKind::Math500, None, None, 0, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("miss.jsonl:1")
                && e.contains("\"answer\"")
                && e.contains("problem, subject"),
            "{e}"
        );
        let p = write("empty.jsonl", "\n\n");
        let e = load_dataset(&p, DatasetKind::Math500, None, None, 0, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty dataset"), "{e}");
        let p = write("nohash.jsonl", "{\"question\":\"q\",\"answer\":\"12\"}\n");
        let e = load_dataset(&p, DatasetKind::Gsm8k, None, None, 0, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("####"), "{e}");
    }
}
