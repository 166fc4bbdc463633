//! K charge-payment worker processes, kept running: one that exits on its own (a start while
//! the store is down fails, by design) is started again a second later, as a supervisor
//! (systemd, Kubernetes) would, and counted; [`Pool::kill_random`]
//! SIGKILLs one and starts its replacement at once.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use rand::Rng;

/// How long a worker that exited on its own stays down before it is started again.
pub const RESTART_DELAY: Duration = Duration::from_secs(1);

/// The worker processes of a run.
pub struct Pool {
    bin: PathBuf,
    dir: PathBuf,
    env: Vec<(String, String)>,
    slots: Vec<Option<Child>>,
    /// When each empty slot is due to start again.
    restart_at: Vec<Option<Instant>>,
    /// SIGKILLs sent.
    pub kills: u64,
    /// Exits nobody asked for (each restarted), with their status.
    pub exits: Vec<ExitStatus>,
    /// Processes started in all.
    pub starts: u64,
}

impl Pool {
    /// Starts `k` workers of `bin` with `env`, logs in `dir/worker-<i>.log`.
    pub fn start(
        bin: &Path,
        dir: &Path,
        env: Vec<(String, String)>,
        k: usize,
    ) -> anyhow::Result<Self> {
        let mut pool = Self {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            env,
            slots: (0..k).map(|_| None).collect(),
            restart_at: vec![None; k],
            kills: 0,
            exits: Vec::new(),
            starts: 0,
        };
        for i in 0..k {
            pool.spawn(i)?;
        }
        Ok(pool)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("worker-{i}.log")))?;
        let child = Command::new(&self.bin)
            .arg("run")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.slots[i] = Some(child);
        self.starts += 1;
        Ok(())
    }

    /// Starts again, after [`RESTART_DELAY`], every worker that exited on its own.
    pub fn supervise(&mut self) -> anyhow::Result<()> {
        for i in 0..self.slots.len() {
            let exited = match self.slots[i].as_mut() {
                Some(c) => c.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                self.exits.push(status);
                self.slots[i] = None;
                self.restart_at[i] = Some(Instant::now() + RESTART_DELAY);
            }
            if self.restart_at[i].is_some_and(|at| Instant::now() >= at) {
                self.restart_at[i] = None;
                self.spawn(i)?;
            }
        }
        Ok(())
    }

    /// SIGKILLs a random worker and starts its replacement.
    pub fn kill_random(&mut self, rng: &mut impl Rng) -> anyhow::Result<()> {
        let i = rng.gen_range(0..self.slots.len());
        if let Some(mut c) = self.slots[i].take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
            self.kills += 1;
        }
        self.restart_at[i] = None;
        self.spawn(i)
    }

    /// Replaces the environment of the workers started from now on (a rotated secret).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Starts every slot that has no process (after [`Pool::stop`]).
    pub fn restart_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.slots.len() {
            if self.slots[i].is_none() {
                self.restart_at[i] = None;
                self.spawn(i)?;
            }
        }
        Ok(())
    }

    /// The process ids running now.
    pub fn pids(&self) -> Vec<u32> {
        self.slots.iter().flatten().map(Child::id).collect()
    }

    /// SIGTERM to every worker, as a deploy does; SIGKILL for those still up after `grace`.
    /// Returns the exit statuses of those that stopped in time.
    pub async fn stop(&mut self, grace: Duration) -> Vec<ExitStatus> {
        for c in self.slots.iter().flatten() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + grace;
        let mut statuses = Vec::new();
        for slot in &mut self.slots {
            let Some(mut c) = slot.take() else { continue };
            loop {
                match c.try_wait() {
                    Ok(Some(st)) => {
                        statuses.push(st);
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
        statuses
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for c in self.slots.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
