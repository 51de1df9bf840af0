//! What the user watches while a run goes: an indicatif bar on a terminal, plain periodic lines
//! elsewhere (CI, nohup, log files), nothing with `--quiet`.
//!
//! [`TrainProgress`] shows the optimizer steps (epoch, step/total, loss, average loss, lr, speed,
//! ETA); [`TaskProgress`] any other counted pass (caching latents, labelling images). Speed and
//! ETA are measured here over the last [`RATE_WINDOW`] updates, the same way in both modes, so a
//! resumed run's ETA counts only the steps it still has to do.

use std::collections::VecDeque;
use std::io::{self, IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How many recent updates the speed is measured over.
pub const RATE_WINDOW: usize = 20;

/// Where progress goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisplayMode {
    /// A redrawn indicatif bar on stderr.
    Bar,
    /// A line on stderr now and then (see [`Cadence`]).
    Plain,
    /// No progress output (messages passed to `println` are still printed).
    Quiet,
}

impl DisplayMode {
    /// [`Quiet`](Self::Quiet) if asked; else a bar when stderr is a terminal, plain lines when not.
    pub fn detect(quiet: bool) -> DisplayMode {
        if quiet {
            DisplayMode::Quiet
        } else if io::stderr().is_terminal() {
            DisplayMode::Bar
        } else {
            DisplayMode::Plain
        }
    }
}

/// When plain mode prints: at the first update, whenever `every` has passed since the last line
/// or the position is a multiple of `every_steps`, and at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cadence {
    pub every: Duration,
    pub every_steps: Option<u64>,
}

impl Default for Cadence {
    fn default() -> Self {
        Cadence {
            every: Duration::from_secs(10),
            every_steps: None,
        }
    }
}

/// The state of training after an optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStatus {
    /// 1-based epoch number.
    pub epoch: u64,
    pub epochs: u64,
    /// Optimizer steps done (1 after the first).
    pub step: u64,
    pub loss: f32,
    pub average_loss: f32,
    pub lr: f64,
    /// Tokens (of the records, not padding) per second of the step (language models).
    pub tokens_per_sec: Option<f32>,
}

/// Progress of the training steps.
pub struct TrainProgress {
    view: View,
    total: u64,
    last: Option<StepStatus>,
}

impl TrainProgress {
    /// A display for a run of `total_steps` optimizer steps whose first step in this process is
    /// `start_step + 1` (`start_step` is 0 unless resumed).
    pub fn new(mode: DisplayMode, total_steps: u64, start_step: u64) -> TrainProgress {
        let view = View::new(mode, start_step, Instant::now(), || {
            let bar = ProgressBar::new(total_steps).with_position(start_step);
            bar.set_prefix("training");
            bar.set_style(style(
                "{prefix} [{wide_bar:.cyan/blue}] {pos}/{len} [{elapsed_precise}] {msg}",
            ));
            bar
        });
        TrainProgress {
            view,
            total: total_steps,
            last: None,
        }
    }

    /// Plain lines to `out` instead of stderr (a log file; tests).
    pub fn plain_to(out: Box<dyn Write + Send>, total_steps: u64, start_step: u64) -> Self {
        TrainProgress {
            view: View::plain(out, start_step, Instant::now()),
            total: total_steps,
            last: None,
        }
    }

    /// Sets when plain mode prints (no effect on a bar).
    pub fn with_cadence(mut self, cadence: Cadence) -> Self {
        if let Output::Plain(lines) = &mut self.view.output {
            lines.cadence = cadence;
        }
        self
    }

    /// Shows the state after an optimizer step.
    pub fn update(&mut self, status: &StepStatus) {
        self.update_at(status, Instant::now());
    }

    fn update_at(&mut self, status: &StepStatus, now: Instant) {
        self.last = Some(*status);
        self.view.meter.record(now, status.step);
        match &mut self.view.output {
            Output::Bar(bar) => {
                bar.set_prefix(format!("epoch {}/{}", status.epoch, status.epochs));
                bar.set_message(format!(
                    "{}  {}",
                    train_fields(status),
                    speed_fields(&self.view.meter, status.step, self.total, None)
                ));
                bar.set_position(status.step);
            }
            Output::Plain(lines) => {
                if lines.due(now, status.step, self.total) {
                    let line = plain_train_line(status, self.total, &self.view.meter, now);
                    lines.emit(now, status.step, &line);
                }
            }
            Output::Quiet => {}
        }
    }

    /// Prints a message (a warning, "checkpoint saved") without breaking the bar.
    pub fn println(&mut self, message: &str) {
        self.view.println(message);
    }

    /// Ends the display; plain mode prints the last state if it has not yet.
    pub fn finish(&mut self) {
        self.finish_at(Instant::now());
    }

    fn finish_at(&mut self, now: Instant) {
        match &mut self.view.output {
            Output::Bar(bar) => bar.abandon(),
            Output::Plain(lines) => {
                if let Some(status) = self.last.filter(|s| lines.last_pos != Some(s.step)) {
                    let line = plain_train_line(&status, self.total, &self.view.meter, now);
                    lines.emit(now, status.step, &line);
                }
            }
            Output::Quiet => {}
        }
    }
}

/// Progress of a counted pass other than training (caching latents, labelling).
pub struct TaskProgress {
    view: View,
    label: String,
    total: u64,
    done: u64,
}

impl TaskProgress {
    /// A display for `total` items, titled `label` ("caching latents").
    pub fn new(mode: DisplayMode, label: &str, total: u64) -> TaskProgress {
        let view = View::new(mode, 0, Instant::now(), || {
            let bar = ProgressBar::new(total);
            bar.set_style(style(
                "{prefix} [{wide_bar:.green/blue}] {pos}/{len} [{elapsed_precise}] {msg}",
            ));
            bar.set_prefix(label.to_string());
            bar
        });
        TaskProgress {
            view,
            label: label.to_string(),
            total,
            done: 0,
        }
    }

    /// Plain lines to `out` instead of stderr (a log file; tests).
    pub fn plain_to(out: Box<dyn Write + Send>, label: &str, total: u64) -> TaskProgress {
        TaskProgress {
            view: View::plain(out, 0, Instant::now()),
            label: label.to_string(),
            total,
            done: 0,
        }
    }

    /// Sets when plain mode prints (no effect on a bar).
    pub fn with_cadence(mut self, cadence: Cadence) -> Self {
        if let Output::Plain(lines) = &mut self.view.output {
            lines.cadence = cadence;
        }
        self
    }

    /// Counts `n` more items done.
    pub fn inc(&mut self, n: u64) {
        self.inc_at(n, Instant::now());
    }

    fn inc_at(&mut self, n: u64, now: Instant) {
        self.done += n;
        self.view.meter.record(now, self.done);
        match &mut self.view.output {
            Output::Bar(bar) => {
                let speed = speed_fields(&self.view.meter, self.done, self.total, None);
                bar.set_message(speed);
                bar.set_position(self.done);
            }
            Output::Plain(lines) => {
                if lines.due(now, self.done, self.total) {
                    let line =
                        plain_task_line(&self.label, self.done, self.total, &self.view.meter, now);
                    lines.emit(now, self.done, &line);
                }
            }
            Output::Quiet => {}
        }
    }

    /// Prints a message (a skipped file) without breaking the bar.
    pub fn println(&mut self, message: &str) {
        self.view.println(message);
    }

    /// Ends the display: the bar is cleared, plain mode prints the last count if it has not yet.
    pub fn finish(&mut self) {
        let now = Instant::now();
        match &mut self.view.output {
            Output::Bar(bar) => bar.finish_and_clear(),
            Output::Plain(lines) => {
                if lines.last_pos != Some(self.done) {
                    let line =
                        plain_task_line(&self.label, self.done, self.total, &self.view.meter, now);
                    lines.emit(now, self.done, &line);
                }
            }
            Output::Quiet => {}
        }
    }
}

/// The part both displays share: where output goes and the speed meter.
struct View {
    output: Output,
    meter: Meter,
}

enum Output {
    Bar(ProgressBar),
    Plain(PlainLines),
    Quiet,
}

impl View {
    fn new(mode: DisplayMode, start: u64, now: Instant, bar: impl FnOnce() -> ProgressBar) -> View {
        match mode {
            DisplayMode::Bar => {
                let bar = bar();
                bar.enable_steady_tick(Duration::from_secs(1));
                View {
                    output: Output::Bar(bar),
                    meter: Meter::new(now, start),
                }
            }
            DisplayMode::Plain => View::plain(Box::new(io::stderr()), start, now),
            DisplayMode::Quiet => View {
                output: Output::Quiet,
                meter: Meter::new(now, start),
            },
        }
    }

    fn plain(out: Box<dyn Write + Send>, start: u64, now: Instant) -> View {
        View {
            output: Output::Plain(PlainLines {
                out,
                cadence: Cadence::default(),
                last_at: None,
                last_pos: None,
            }),
            meter: Meter::new(now, start),
        }
    }

    fn println(&mut self, message: &str) {
        match &mut self.output {
            // Output errors are not worth stopping a run for.
            Output::Bar(bar) => bar.suspend(|| {
                let _ = writeln!(io::stderr(), "{message}");
            }),
            Output::Plain(lines) => {
                let _ = writeln!(lines.out, "{message}");
                let _ = lines.out.flush();
            }
            Output::Quiet => {
                let _ = writeln!(io::stderr(), "{message}");
            }
        }
    }
}

/// Plain mode's writer and its memory of the last line.
struct PlainLines {
    out: Box<dyn Write + Send>,
    cadence: Cadence,
    last_at: Option<Instant>,
    last_pos: Option<u64>,
}

impl PlainLines {
    fn due(&self, now: Instant, pos: u64, total: u64) -> bool {
        if self.last_pos == Some(pos) {
            return false;
        }
        let Some(last_at) = self.last_at else {
            return true;
        };
        now.saturating_duration_since(last_at) >= self.cadence.every
            || self
                .cadence
                .every_steps
                .is_some_and(|n| n > 0 && pos.is_multiple_of(n))
            || pos >= total
    }

    fn emit(&mut self, now: Instant, pos: u64, line: &str) {
        let _ = writeln!(self.out, "{line}");
        let _ = self.out.flush();
        self.last_at = Some(now);
        self.last_pos = Some(pos);
    }
}

/// Items per second over the last [`RATE_WINDOW`] updates, and time since the start.
struct Meter {
    started: Instant,
    samples: VecDeque<(Instant, u64)>,
}

impl Meter {
    fn new(now: Instant, start: u64) -> Meter {
        let mut samples = VecDeque::with_capacity(RATE_WINDOW + 1);
        samples.push_back((now, start));
        Meter {
            started: now,
            samples,
        }
    }

    fn record(&mut self, now: Instant, pos: u64) {
        if self.samples.len() > RATE_WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back((now, pos));
    }

    /// Items per second, once something has been done.
    fn rate(&self) -> Option<f64> {
        let (t0, p0) = *self.samples.front()?;
        let (t1, p1) = *self.samples.back()?;
        let secs = t1.saturating_duration_since(t0).as_secs_f64();
        (p1 > p0 && secs > 0.0).then(|| (p1 - p0) as f64 / secs)
    }

    fn elapsed(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// `loss 0.1234  avg 0.1302  lr 1.00e-4`
fn train_fields(s: &StepStatus) -> String {
    let tokens = match s.tokens_per_sec {
        Some(t) => format!("  {t:.0} tok/s"),
        None => String::new(),
    };
    format!(
        "loss {:.4}  avg {:.4}  lr {:.2e}{tokens}",
        s.loss, s.average_loss, s.lr
    )
}

/// `4.76 s/it  [elapsed 9:31  ]ETA 1:09:12`
fn speed_fields(meter: &Meter, pos: u64, total: u64, elapsed: Option<Duration>) -> String {
    let rate = meter.rate();
    let speed = match rate {
        Some(r) if r >= 1.0 => format!("{r:.2} it/s"),
        Some(r) => format!("{:.2} s/it", 1.0 / r),
        None => "-- it/s".to_string(),
    };
    let eta = match rate {
        _ if pos >= total => clock(Duration::ZERO),
        Some(r) => clock(Duration::from_secs_f64((total - pos) as f64 / r.max(1e-9))),
        None => "--".to_string(),
    };
    match elapsed {
        Some(e) => format!("{speed}  elapsed {}  ETA {eta}", clock(e)),
        None => format!("{speed}  ETA {eta}"),
    }
}

/// `epoch 2/10  step 120/1000 (12%)  loss …  avg …  lr …  4.76 s/it  elapsed 9:31  ETA 1:09:12`
fn plain_train_line(s: &StepStatus, total: u64, meter: &Meter, now: Instant) -> String {
    format!(
        "epoch {}/{}  step {}/{total} ({}%)  {}  {}",
        s.epoch,
        s.epochs,
        s.step,
        percent(s.step, total),
        train_fields(s),
        speed_fields(meter, s.step, total, Some(meter.elapsed(now)))
    )
}

/// `caching latents: 120/500 (24%)  12.30 it/s  elapsed 0:10  ETA 0:31`
fn plain_task_line(label: &str, done: u64, total: u64, meter: &Meter, now: Instant) -> String {
    format!(
        "{label}: {done}/{total} ({}%)  {}",
        percent(done, total),
        speed_fields(meter, done, total, Some(meter.elapsed(now)))
    )
}

fn percent(done: u64, total: u64) -> u64 {
    (done.min(total) * 100).checked_div(total).unwrap_or(100)
}

/// `m:ss`, or `h:mm:ss` from an hour on.
fn clock(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m}:{s:02}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A `Write` whose bytes the test can read afterwards.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines().map(str::to_string).collect()
        }
    }

    fn status(step: u64, loss: f32) -> StepStatus {
        StepStatus {
            epoch: 1 + (step - 1) / 4,
            epochs: 3,
            step,
            loss,
            average_loss: loss + 0.5,
            lr: 1e-4,
            tokens_per_sec: None,
        }
    }

    /// A plain train display created at `t0` (the meter's start is re-based on it).
    fn plain_train(total: u64, start: u64, cadence: Cadence) -> (TrainProgress, Captured, Instant) {
        let out = Captured::default();
        let t0 = Instant::now();
        let mut progress = TrainProgress::plain_to(Box::new(out.clone()), total, start);
        progress.view.meter = Meter::new(t0, start);
        (progress.with_cadence(cadence), out, t0)
    }

    #[test]
    fn plain_train_lines_have_every_field() {
        let (mut p, out, t0) = plain_train(12, 0, Cadence::default());
        p.update_at(&status(1, 0.1234), t0 + Duration::from_secs(5));
        p.update_at(&status(2, 0.25), t0 + Duration::from_secs(10));
        assert_eq!(
            out.lines(),
            [
                "epoch 1/3  step 1/12 (8%)  loss 0.1234  avg 0.6234  lr 1.00e-4  5.00 s/it  \
                 elapsed 0:05  ETA 0:55",
            ]
        );
        // 10 s after the first line; then a step too soon for another line.
        p.update_at(&status(3, 0.5), t0 + Duration::from_secs(15));
        p.update_at(&status(5, 0.5), t0 + Duration::from_secs(16));
        assert_eq!(out.lines().len(), 2);
        assert_eq!(
            out.lines()[1],
            "epoch 1/3  step 3/12 (25%)  loss 0.5000  avg 1.0000  lr 1.00e-4  5.00 s/it  \
             elapsed 0:15  ETA 0:45"
        );
    }

    #[test]
    fn a_language_model_step_shows_its_tokens_per_second() {
        let (mut p, out, t0) = plain_train(12, 0, Cadence::default());
        let with_tokens = StepStatus {
            tokens_per_sec: Some(412.6),
            ..status(1, 0.1234)
        };
        p.update_at(&with_tokens, t0 + Duration::from_secs(5));
        assert_eq!(
            out.lines(),
            [
                "epoch 1/3  step 1/12 (8%)  loss 0.1234  avg 0.6234  lr 1.00e-4  413 tok/s  \
                 5.00 s/it  elapsed 0:05  ETA 0:55",
            ]
        );
    }

    #[test]
    fn plain_mode_prints_every_n_steps_and_the_last_step() {
        let cadence = Cadence {
            every: Duration::from_secs(3600),
            every_steps: Some(4),
        };
        let (mut p, out, t0) = plain_train(10, 0, cadence);
        for step in 1..=10 {
            p.update_at(&status(step, 1.0), t0 + Duration::from_secs(step));
        }
        p.finish_at(t0 + Duration::from_secs(11));
        let steps: Vec<_> = out
            .lines()
            .iter()
            .map(|l| l.split("  ").nth(1).unwrap().to_string())
            .collect();
        assert_eq!(
            steps,
            [
                "step 1/10 (10%)",
                "step 4/10 (40%)",
                "step 8/10 (80%)",
                "step 10/10 (100%)"
            ]
        );
        assert!(out.lines()[3].ends_with("1.00 it/s  elapsed 0:10  ETA 0:00"));
    }

    #[test]
    fn finish_prints_an_interrupted_runs_last_state_once() {
        let (mut p, out, t0) = plain_train(100, 0, Cadence::default());
        p.update_at(&status(1, 1.0), t0 + Duration::from_secs(1));
        p.update_at(&status(2, 1.0), t0 + Duration::from_secs(2));
        p.finish_at(t0 + Duration::from_secs(3));
        p.finish_at(t0 + Duration::from_secs(4));
        let lines = out.lines();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].contains("step 2/100 (2%)"), "{}", lines[1]);
    }

    #[test]
    fn a_resumed_runs_speed_counts_only_its_own_steps() {
        let (mut p, out, t0) = plain_train(1000, 400, Cadence::default());
        p.update_at(&status(401, 1.0), t0 + Duration::from_secs(2));
        let line = &out.lines()[0];
        assert!(line.contains("step 401/1000 (40%)"), "{line}");
        // One step in 2 s, 599 to go.
        assert!(
            line.ends_with("2.00 s/it  elapsed 0:02  ETA 19:58"),
            "{line}"
        );
    }

    #[test]
    fn task_lines_and_the_final_count() {
        let out = Captured::default();
        let mut t = TaskProgress::plain_to(Box::new(out.clone()), "caching latents", 500);
        let t0 = Instant::now();
        t.view.meter = Meter::new(t0, 0);
        t.inc_at(1, t0 + Duration::from_millis(100));
        for i in 2..=120u64 {
            t.inc_at(1, t0 + Duration::from_millis(100 * i));
        }
        t.finish();
        let lines = out.lines();
        assert_eq!(
            lines[0],
            "caching latents: 1/500 (0%)  10.00 it/s  elapsed 0:00  ETA 0:49"
        );
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[1].starts_with("caching latents: 101/500 (20%)  10.00 it/s  elapsed 0:10"));
        assert!(lines[2].starts_with("caching latents: 120/500 (24%)"));
    }

    #[test]
    fn messages_reach_the_plain_output() {
        let out = Captured::default();
        let mut p = TrainProgress::plain_to(Box::new(out.clone()), 10, 0);
        p.println("saved output/x-step00000005.safetensors");
        assert_eq!(out.lines(), ["saved output/x-step00000005.safetensors"]);
    }

    #[test]
    fn clock_and_speed_formats() {
        assert_eq!(clock(Duration::from_secs(0)), "0:00");
        assert_eq!(clock(Duration::from_secs(3599)), "59:59");
        assert_eq!(clock(Duration::from_secs(3600 + 61)), "1:01:01");
        let t0 = Instant::now();
        let mut m = Meter::new(t0, 0);
        assert_eq!(speed_fields(&m, 0, 10, None), "-- it/s  ETA --");
        m.record(t0 + Duration::from_millis(250), 1);
        assert_eq!(speed_fields(&m, 1, 10, None), "4.00 it/s  ETA 0:02");
        assert_eq!(percent(3, 0), 100);
    }

    #[test]
    fn bar_mode_runs_without_a_terminal() {
        // Bar mode on a non-terminal draws nothing; it must still accept every call.
        let mut p = TrainProgress::new(DisplayMode::Bar, 10, 2);
        p.update(&status(3, 1.0));
        p.finish();
        let mut t = TaskProgress::new(DisplayMode::Bar, "caching latents", 3);
        t.inc(3);
        t.finish();
        assert!(matches!(p.view.output, Output::Bar(_)));
    }

    #[test]
    fn quiet_mode_prints_no_progress() {
        let mut p = TrainProgress::new(DisplayMode::Quiet, 10, 0);
        p.update(&status(1, 1.0));
        p.finish();
        assert!(matches!(p.view.output, Output::Quiet));
    }
}
