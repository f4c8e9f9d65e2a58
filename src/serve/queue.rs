//! Jobs and the one worker that runs them in order.
//!
//! HTTP handlers [`Queue::submit`] a [`JobSpec`] and watch its [`Snapshot`]; the worker thread (the compute
//! blocks, so it never runs on the async runtime) takes jobs from a bounded channel: past `max_queue` waiting
//! jobs a submit is refused with 503 and a Retry-After. A panic inside a job fails that job only. Finished jobs
//! are kept (their images too) until [`KEEP_FINISHED`] newer ones have finished.
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use super::error::ApiError;
use super::files::new_id;
use crate::annotate::DetectorOptions;
use crate::pipeline::{GenerateRequest, ImageMetadata};

/// Finished jobs kept for their status and images.
pub const KEEP_FINISHED: usize = 64;

/// An annotator the server runs itself, for settings the pipeline's `preprocess` does not take (thresholds, a
/// fixed annotator resolution).
#[derive(Debug, Clone)]
pub struct Annotation {
    pub kind: String,
    pub options: DetectorOptions,
    /// `None`: pixel perfect.
    pub resolution: Option<u32>,
}

/// One pipeline call of a job (A1111's `n_iter` makes several, one after the other).
#[derive(Debug, Clone)]
pub struct Run {
    pub request: GenerateRequest,
    /// The catalog index of each control's ControlNet.
    pub nets: Vec<usize>,
    /// `Some`: the server brings every picture condition to the output size itself (annotating those with an
    /// [`Annotation`]) and the pipeline takes them as they are.
    pub annotations: Option<Vec<Option<Annotation>>>,
}

/// How an API spells a library setting (`guidance` → `cfg_scale`) in its errors.
pub type Namer = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// What a job runs, and how its API spells the library's settings in errors.
#[derive(Clone)]
pub struct JobSpec {
    pub runs: Vec<Run>,
    pub name_of: Namer,
}

impl JobSpec {
    pub fn total_steps(&self) -> usize {
        self.runs.iter().map(|r| r.request.steps).sum()
    }
}

/// One image a job made.
#[derive(Debug, Clone)]
pub struct OutputImage {
    /// The PNG, carrying its recipe (`parameters` and `controlnet-rs` text chunks).
    pub png: Vec<u8>,
    pub metadata: ImageMetadata,
}

#[derive(Debug, Clone, Default)]
pub struct Output {
    pub images: Vec<OutputImage>,
    /// The condition each ControlNet used in the first run, at the output size, as PNG (the maps A1111's
    /// extension appends to its answer); `None` for a condition given as a tensor.
    pub maps: Vec<Option<Vec<u8>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl State {
    pub fn is_finished(self) -> bool {
        matches!(self, State::Done | State::Failed | State::Cancelled)
    }
}

/// A job's state as clients see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    pub id: String,
    pub state: State,
    /// Denoising steps done, of `total` (over all runs of the job).
    pub step: usize,
    pub total: usize,
    /// The seed of each run that has started.
    pub seeds: Vec<u64>,
    /// Warnings (a setting that does nothing, a prompt that was cut).
    pub warnings: Vec<String>,
    /// For a failed or cancelled job: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Images made (when done).
    pub images: usize,
}

pub struct Job {
    pub id: String,
    spec: Mutex<Option<JobSpec>>,
    pub cancel: AtomicBool,
    status: watch::Sender<Snapshot>,
    outcome: Mutex<Option<Result<Arc<Output>, ApiError>>>,
    started: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("id", &self.id).field("status", &self.snapshot()).finish()
    }
}

impl Job {
    fn new(spec: JobSpec) -> Self {
        let id = new_id();
        let snapshot = Snapshot {
            id: id.clone(),
            state: State::Queued,
            step: 0,
            total: spec.total_steps(),
            seeds: Vec::new(),
            warnings: Vec::new(),
            error: None,
            images: 0,
        };
        Self {
            id,
            spec: Mutex::new(Some(spec)),
            cancel: AtomicBool::new(false),
            status: watch::channel(snapshot).0,
            outcome: Mutex::new(None),
            started: Mutex::new(None),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        self.status.borrow().clone()
    }

    pub fn watch(&self) -> watch::Receiver<Snapshot> {
        self.status.subscribe()
    }

    /// The result once the job has finished.
    pub fn outcome(&self) -> Option<Result<Arc<Output>, ApiError>> {
        lock(&self.outcome).clone()
    }

    /// Waits for the job to finish and returns its result.
    pub async fn finished(&self) -> Result<Arc<Output>, ApiError> {
        let mut rx = self.watch();
        // An error only when the sender is gone, which the job itself prevents.
        let _ = rx.wait_for(|s| s.state.is_finished()).await;
        self.outcome().unwrap_or_else(|| Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the job vanished")))
    }

    /// Seconds since the job started running.
    pub fn running_for(&self) -> Option<f64> {
        lock(&self.started).map(|t| t.elapsed().as_secs_f64())
    }

    /// Raises the cancel flag: a queued job is dropped when its turn comes, a running one stops after its
    /// current step.
    pub fn request_cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Called by the runner: progress within the job.
    pub fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        self.status.send_modify(f);
    }

    fn finish(&self, outcome: Result<Output, ApiError>) {
        let (state, error, images) = match &outcome {
            Ok(out) => (State::Done, None, out.images.len()),
            Err(e) if e.status == StatusCode::CONFLICT && self.cancel.load(Ordering::SeqCst) => {
                (State::Cancelled, Some(e.detail()), 0)
            }
            Err(e) => (State::Failed, Some(e.detail()), 0),
        };
        *lock(&self.outcome) = Some(outcome.map(Arc::new));
        self.status.send_modify(|s| {
            s.state = state;
            s.error = error;
            s.images = images;
            if state == State::Done {
                s.step = s.total;
            }
        });
    }
}

/// The jobs of a server: the channel to the worker and every job not yet forgotten.
pub struct Queue {
    sender: Mutex<Option<mpsc::Sender<Arc<Job>>>>,
    jobs: Mutex<Jobs>,
    current: Mutex<Option<Arc<Job>>>,
    waiting: AtomicUsize,
    /// How long the last finished job ran, for Retry-After.
    last_duration: Mutex<Duration>,
}

#[derive(Default)]
struct Jobs {
    by_id: HashMap<String, Arc<Job>>,
    finished: VecDeque<String>,
}

impl Queue {
    /// A queue holding at most `max_queue` waiting jobs, and the receiving end for the worker.
    pub fn new(max_queue: usize) -> (Arc<Self>, mpsc::Receiver<Arc<Job>>) {
        let (tx, rx) = mpsc::channel(max_queue.max(1));
        let queue = Self {
            sender: Mutex::new(Some(tx)),
            jobs: Mutex::new(Jobs::default()),
            current: Mutex::new(None),
            waiting: AtomicUsize::new(0),
            last_duration: Mutex::new(Duration::from_secs(1)),
        };
        (Arc::new(queue), rx)
    }

    /// Queues a job; 503 with a Retry-After when the queue is full or the server is stopping.
    pub fn submit(&self, spec: JobSpec) -> Result<Arc<Job>, ApiError> {
        let job = Arc::new(Job::new(spec));
        let sender = lock(&self.sender).clone();
        let Some(sender) = sender else {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down"));
        };
        // Listed and counted before it is sent: the worker may take it (and count it off) at once.
        lock(&self.jobs).by_id.insert(job.id.clone(), job.clone());
        self.waiting.fetch_add(1, Ordering::SeqCst);
        if sender.try_send(job.clone()).is_err() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            lock(&self.jobs).by_id.remove(&job.id);
            let waiting = self.waiting.load(Ordering::SeqCst) as u64 + 1;
            let secs = lock(&self.last_duration).as_secs().max(1) * waiting;
            return Err(ApiError {
                retry_after: Some(secs),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the queue is full ({waiting} jobs); try again later"),
                )
            });
        }
        Ok(job)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        lock(&self.jobs).by_id.get(id).cloned()
    }

    /// The running job, if any.
    pub fn current(&self) -> Option<Arc<Job>> {
        lock(&self.current).clone()
    }

    /// Jobs waiting for the worker (the running one not counted).
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Cancels the running job (A1111's interrupt); returns whether one was running.
    pub fn interrupt(&self) -> bool {
        match self.current() {
            Some(job) => {
                job.request_cancel();
                true
            }
            None => false,
        }
    }

    /// Stops taking jobs; the worker ends once it has run those already queued.
    pub fn stop_taking(&self) {
        lock(&self.sender).take();
    }

    /// Stops taking jobs and cancels every job not finished; the worker ends once it has told them so.
    pub fn shut_down(&self) {
        self.stop_taking();
        for job in lock(&self.jobs).by_id.values() {
            job.request_cancel();
        }
    }

    fn forget_old(&self, finished: &Job) {
        let mut jobs = lock(&self.jobs);
        jobs.finished.push_back(finished.id.clone());
        while jobs.finished.len() > KEEP_FINISHED {
            if let Some(old) = jobs.finished.pop_front() {
                jobs.by_id.remove(&old);
            }
        }
    }

    /// The worker's loop: takes jobs in order and runs each with `run` until the queue is shut down and empty.
    pub fn work(
        &self,
        mut rx: mpsc::Receiver<Arc<Job>>,
        mut run: impl FnMut(&Job, JobSpec) -> Result<Output, ApiError>,
    ) {
        while let Some(job) = rx.blocking_recv() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            let spec = lock(&job.spec).take();
            let outcome = match spec {
                _ if job.cancel.load(Ordering::SeqCst) => {
                    Err(ApiError::new(StatusCode::CONFLICT, "cancelled before it started"))
                }
                None => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the job was taken twice")),
                Some(spec) => {
                    *lock(&self.current) = Some(job.clone());
                    *lock(&job.started) = Some(Instant::now());
                    job.update(|s| s.state = State::Running);
                    let t0 = Instant::now();
                    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| run(&job, spec))).unwrap_or_else(|p| {
                        let what = p
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| p.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("the job failed: {what}")))
                    });
                    *lock(&self.last_duration) = t0.elapsed();
                    *lock(&self.current) = None;
                    outcome
                }
            };
            job.finish(outcome);
            self.forget_old(&job);
        }
    }
}

/// A lock that survives a panic elsewhere (the data are plain values, always consistent between statements).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(prompt: &str) -> JobSpec {
        let request = GenerateRequest { prompt: prompt.into(), steps: 2, ..Default::default() };
        JobSpec { runs: vec![Run { request, nets: vec![], annotations: None }], name_of: Arc::new(|s| s.to_string()) }
    }

    #[test]
    fn jobs_run_in_order_and_a_panic_fails_only_its_job() {
        let (queue, rx) = Queue::new(4);
        let jobs: Vec<_> = ["a", "panic", "c"].iter().map(|p| queue.submit(spec(p)).unwrap()).collect();
        assert_eq!(queue.waiting(), 3);
        let order = Mutex::new(Vec::new());
        queue.stop_taking();
        queue.work(rx, |job, spec| {
            let prompt = spec.runs[0].request.prompt.clone();
            lock(&order).push(prompt.clone());
            assert!(prompt != "panic", "boom");
            job.update(|s| s.step = 1);
            Ok(Output::default())
        });
        assert_eq!(*lock(&order), ["a", "panic", "c"]);
        let states: Vec<State> = jobs.iter().map(|j| j.snapshot().state).collect();
        assert_eq!(states, [State::Done, State::Failed, State::Done]);
        assert!(jobs[1].snapshot().error.unwrap().contains("boom"));
        assert_eq!(queue.waiting(), 0);
    }

    #[test]
    fn a_full_queue_refuses_with_retry_after() {
        let (queue, _rx) = Queue::new(2);
        queue.submit(spec("a")).unwrap();
        queue.submit(spec("b")).unwrap();
        let e = queue.submit(spec("c")).unwrap_err();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.retry_after.is_some_and(|s| s >= 1));
        assert_eq!(queue.waiting(), 2);
    }

    #[test]
    fn a_cancelled_job_is_not_run_and_shutdown_refuses_new_ones() {
        let (queue, rx) = Queue::new(4);
        let a = queue.submit(spec("a")).unwrap();
        a.request_cancel();
        queue.shut_down();
        assert_eq!(queue.submit(spec("b")).unwrap_err().status, StatusCode::SERVICE_UNAVAILABLE);
        queue.work(rx, |_, _| panic!("a cancelled job ran"));
        assert_eq!(a.snapshot().state, State::Cancelled);
    }
}
