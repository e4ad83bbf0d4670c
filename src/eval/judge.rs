//! The optional external judge: a user command (run through `sh -c`) that reads
//! `{"question","reference","response"}` as JSON on stdin and prints `true`/`false` or
//! `{"correct": bool}` on stdout. Lets a user plug in any grader (an LLM judge, sympy) without
//! this crate depending on one. `Judge` is a run's use of it: a failure leaves one answer
//! awaiting the judge, and several in a row stop the run (the judge is down).

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// Seconds a judge may take on one answer before it is stopped and that answer awaits the judge
/// (`THINKSTEER_JUDGE_TIMEOUT` sets another): a judge that hangs (a stalled API call) would
/// otherwise stall the whole run.
pub fn judge_timeout() -> Result<std::time::Duration> {
    let secs = match std::env::var("THINKSTEER_JUDGE_TIMEOUT") {
        Err(_) => 300.0,
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .ok_or_else(|| {
                Error::Input(format!(
                    "THINKSTEER_JUDGE_TIMEOUT: expected seconds above 0, found {v:?}"
                ))
            })?,
    };
    // Duration::from_secs_f64 refuses what it cannot hold.
    Ok(std::time::Duration::from_secs_f64(secs.min(1e9)))
}

/// Runs the judge command on one graded item and returns its verdict.
pub fn run_judge(cmd: &str, question: &str, reference: &str, response: &str) -> Result<bool> {
    run_judge_within(cmd, question, reference, response, judge_timeout()?)
}

/// `run_judge`, stopping a judge that takes longer than `limit`.
fn run_judge_within(
    cmd: &str,
    question: &str,
    reference: &str,
    response: &str,
    limit: std::time::Duration,
) -> Result<bool> {
    let input = serde_json::json!({
        "question": question,
        "reference": reference,
        "response": response,
    })
    .to_string();
    // Its own process group, so that a judge stopped for taking too long is stopped whole: `sh`
    // runs the command as its child, which would otherwise live on holding the pipes.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .process_group(0)
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
    // Its output read from threads, which end when every process of the judge has closed the
    // pipes; the wait for them gives up at the same deadline as the wait for `sh`.
    let (tx, rx) = std::sync::mpsc::channel();
    for (which, pipe) in [
        (
            0,
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
        (
            1,
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            let _ = tx.send((which, buf));
        });
    }
    let deadline = std::time::Instant::now() + limit;
    let stopped = |child: &mut std::process::Child, what: &str| {
        // The whole group (`kill` takes a negative id as a process group), then `sh` itself.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = child.kill();
        let _ = child.wait();
        Error::Input(format!(
            "judge command {cmd:?}: expected a verdict within {:.0} s (THINKSTEER_JUDGE_TIMEOUT), found {what}: stopped",
            limit.as_secs_f64()
        ))
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Ok(None) => return Err(stopped(&mut child, "none")),
            Err(e) => {
                let _ = stopped(&mut child, "an error");
                return Err(Error::Input(format!("judge command {cmd:?}: {e}")));
            }
        }
    };
    let mut outputs = [Vec::new(), Vec::new()];
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok((which, buf)) => outputs[which] = buf,
            // Something it started still holds its output open.
            Err(_) => return Err(stopped(&mut child, "its output still open")),
        }
    }
    let [stdout, stderr] = outputs;
    let out = std::process::Output {
        status,
        stdout,
        stderr,
    };
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

/// Failures in a row after which the judge counts as down: one failure may be that answer (a
/// response the judge cannot parse), three in a row are the judge itself (an API that went away).
pub const JUDGE_DOWN_AFTER: usize = 3;

/// The judge of one run: its command, and how many of its calls in a row have failed. Once
/// it is down it is not called again, so the answers still coming are written at once, to be
/// judged when the run is started again.
pub struct Judge {
    cmd: String,
    failed_in_a_row: usize,
    last_error: String,
}

impl Judge {
    pub fn new(cmd: &str) -> Judge {
        Judge {
            cmd: cmd.to_string(),
            failed_in_a_row: 0,
            last_error: String::new(),
        }
    }

    /// The verdict on one response, or the one-line reason there is none.
    pub fn verdict(
        &mut self,
        question: &str,
        reference: &str,
        response: &str,
    ) -> std::result::Result<bool, String> {
        if self.is_down() {
            return Err(format!(
                "not judged: the judge had failed {JUDGE_DOWN_AFTER} times in a row"
            ));
        }
        match run_judge(&self.cmd, question, reference, response) {
            Ok(v) => {
                self.failed_in_a_row = 0;
                Ok(v)
            }
            Err(e) => {
                self.failed_in_a_row += 1;
                self.last_error = e.to_string();
                Err(self.last_error.clone())
            }
        }
    }

    pub fn is_down(&self) -> bool {
        self.failed_in_a_row >= JUDGE_DOWN_AFTER
    }

    /// The error that stops a run whose judge is down.
    pub fn down_error(&self) -> Option<Error> {
        self.is_down().then(|| {
            Error::Input(format!(
                "--judge-cmd: expected verdicts, found {JUDGE_DOWN_AFTER} failures in a row (the last: {}); the answers so far are written, awaiting the judge: start the same eval again once the judge works, to judge them and go on",
                self.last_error
            ))
        })
    }
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
    use super::{run_judge, run_judge_within, Judge, JUDGE_DOWN_AFTER};

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

    /// A judge that takes too long is stopped whole: `sh` and the command it runs (here a
    /// `sleep` that would otherwise live on holding the pipes), and one that leaves its output
    /// open behind it (a background `sleep`) too.
    #[test]
    fn a_judge_that_takes_too_long_is_stopped() {
        let limit = std::time::Duration::from_secs(1);
        for (cmd, found) in [
            ("sleep 20; echo true", "found none"),
            ("sleep 20 & echo true", "found its output still open"),
        ] {
            let start = std::time::Instant::now();
            let e = run_judge_within(cmd, "q", "1", "1", limit)
                .unwrap_err()
                .to_string();
            assert!(e.contains("within 1 s") && e.contains(found), "{cmd}: {e}");
            assert!(start.elapsed().as_secs_f64() < 10.0, "{cmd}: not stopped");
        }
        // No `sleep 20` of these judges is left running.
        let left = std::process::Command::new("pgrep")
            .args(["-f", "^sleep 20$"])
            .output();
        if let Ok(o) = left {
            assert!(o.stdout.is_empty(), "left running: {:?}", o.stdout);
        }
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

    #[test]
    fn a_judge_is_down_after_failures_in_a_row_only() {
        let dir = std::env::temp_dir().join(format!("thinksteer-judge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let marker = dir.join("down");
        // Fails while the marker file exists.
        let mut j = Judge::new(&format!(
            "test -e {} && exit 4; echo true",
            marker.display()
        ));
        std::fs::write(&marker, "").unwrap();
        for _ in 1..JUDGE_DOWN_AFTER {
            assert!(j
                .verdict("q", "1", "1")
                .unwrap_err()
                .contains("exit status: 4"));
        }
        std::fs::remove_file(&marker).unwrap();
        assert_eq!(
            j.verdict("q", "1", "1"),
            Ok(true),
            "a success ends the streak"
        );
        std::fs::write(&marker, "").unwrap();
        for _ in 0..JUDGE_DOWN_AFTER {
            assert!(j.down_error().is_none());
            assert!(j.verdict("q", "1", "1").is_err());
        }
        let e = j.down_error().expect("down").to_string();
        assert!(
            e.contains("3 failures in a row") && e.contains("exit status: 4"),
            "{e}"
        );
        // Down: not called again, even once it would work.
        std::fs::remove_file(&marker).unwrap();
        assert!(j.verdict("q", "1", "1").unwrap_err().contains("not judged"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
