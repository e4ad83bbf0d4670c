//! The optional external judge: a user command (run through `sh -c`) that reads
//! `{"question","reference","response"}` as JSON on stdin and prints `true`/`false` or
//! `{"correct": bool}` on stdout. Lets a user plug in any grader (an LLM judge, sympy) without
//! this crate depending on one.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// Runs the judge command on one graded item and returns its verdict.
pub fn run_judge(cmd: &str, question: &str, reference: &str, response: &str) -> Result<bool> {
    let input = serde_json::json!({
        "question": question,
        "reference": reference,
        "response": response,
    })
    .to_string();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Input(format!("judge command {cmd:?}: could not start sh: {e}")))?;
    let mut stdin = child.stdin.take().expect("stdin was piped");
    // Written from a thread so a judge that prints before reading cannot deadlock on full pipes.
    let writer = std::thread::spawn(move || {
        let r = stdin.write_all(input.as_bytes());
        // A judge that never reads its input closes the pipe early; that is not an error.
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other,
        }
    });
    let out = child
        .wait_with_output()
        .map_err(|e| Error::Input(format!("judge command {cmd:?}: {e}")))?;
    let wrote = writer.join();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or("").trim();
        return Err(Error::Input(format!(
            "judge command {cmd:?} failed with {}: {first}",
            out.status
        )));
    }
    if let Ok(Err(e)) = wrote {
        return Err(Error::Input(format!(
            "judge command {cmd:?}: writing its stdin failed: {e}"
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    parse_verdict(text.trim()).ok_or_else(|| {
        let shown: String = text.trim().chars().take(80).collect();
        Error::Input(format!(
            "judge command {cmd:?}: expected true, false or {{\"correct\": bool}} on stdout, found {shown:?}"
        ))
    })
}

fn parse_verdict(text: &str) -> Option<bool> {
    match text.to_ascii_lowercase().as_str() {
        "true" => return Some(true),
        "false" => return Some(false),
        _ => {}
    }
    match serde_json::from_str::<serde_json::Value>(text).ok()? {
        serde_json::Value::Bool(b) => Some(b),
        serde_json::Value::Object(m) => m.get("correct")?.as_bool(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::run_judge;

    #[test]
    fn verdicts() {
        assert!(run_judge("echo true", "q", "1", "1").unwrap());
        assert!(!run_judge("echo FALSE", "q", "1", "1").unwrap());
        assert!(run_judge("echo '{\"correct\": true}'", "q", "1", "1").unwrap());
        // The judge sees the JSON on stdin: this one says true only when the response is "7".
        let cmd = "grep -q '\"response\":\"7\"' && echo true || echo false";
        assert!(run_judge(cmd, "q", "7", "7").unwrap());
        assert!(!run_judge(cmd, "q", "7", "8").unwrap());
    }

    #[test]
    fn failures_name_the_command() {
        let e = run_judge("exit 3", "q", "1", "1").unwrap_err().to_string();
        assert!(e.contains("exit 3") && e.contains("failed"), "{e}");
        let e = run_judge("echo maybe", "q", "1", "1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("echo maybe") && e.contains("maybe"), "{e}");
    }
}
