//! Progress on stderr for every long-running subcommand: a bar on a terminal, plain lines otherwise (a `nohup`
//! log or a pipe), so a log always shows how far a run got.
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Plain lines are written at most this often (and at the first and last step).
const PLAIN_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    label: String,
    mode: Mode,
}

enum Mode {
    Hidden,
    Bar(ProgressBar),
    Plain { started: Instant, last: Option<Instant>, message: String },
}

impl Progress {
    /// `label` names what is counted ("step", "vae step"); `quiet` hides everything.
    pub fn new(quiet: bool, label: &str, total: u64) -> Self {
        let mode = if quiet {
            Mode::Hidden
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            let template =
                format!("{{spinner}} {label} {{pos}}/{{len}} [{{bar:30}}] {{elapsed}} (ETA {{eta}}) {{msg}}");
            if let Ok(style) = ProgressStyle::with_template(&template) {
                bar.set_style(style.progress_chars("=> "));
            }
            Mode::Bar(bar)
        } else {
            Mode::Plain { started: Instant::now(), last: None, message: String::new() }
        };
        Self { label: label.to_string(), mode }
    }

    /// `done` of `total` finished.
    pub fn set(&mut self, done: u64, total: u64) {
        match &mut self.mode {
            Mode::Hidden => {}
            Mode::Bar(bar) => {
                bar.set_length(total);
                bar.set_position(done);
            }
            Mode::Plain { started, last, message } => {
                let now = Instant::now();
                let due = last.is_none_or(|t| now.duration_since(t) >= PLAIN_EVERY) || done >= total;
                if due {
                    let secs = now.duration_since(*started).as_secs_f64();
                    let sep = if message.is_empty() { "" } else { ", " };
                    eprintln!("{} {done}/{total} ({secs:.1} s{sep}{message})", self.label);
                    *last = Some(now);
                }
            }
        }
    }

    /// A short note shown beside the count (a loss, a stage).
    pub fn set_message(&mut self, msg: impl Into<String>) {
        match &mut self.mode {
            Mode::Hidden => {}
            Mode::Bar(bar) => bar.set_message(msg.into()),
            Mode::Plain { message, .. } => *message = msg.into(),
        }
    }

    /// Removes the bar (plain lines stay in the log).
    pub fn finish(&self) {
        if let Mode::Bar(bar) = &self.mode {
            bar.finish_and_clear();
        }
    }
}
