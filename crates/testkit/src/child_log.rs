//! A child process's output read line by line on a thread as it comes, so
//! that a test can wait for a line while the child runs (its stderr, where
//! the agent logs).

use std::io::{BufRead as _, BufReader, Read};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The lines read so far from one stream of a child.
#[derive(Debug)]
pub struct ChildLog {
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl ChildLog {
    /// Starts reading `stream` (taken from the child, e.g.
    /// `child.stderr.take()`); the reader ends when the stream closes.
    pub fn follow(stream: impl Read + Send + 'static) -> Self {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            lines,
            reader: Some(reader),
        }
    }

    /// How many lines so far: a mark to search from.
    pub fn count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// Every line so far, one per line.
    pub fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The first line at or after `from` containing `needle`, with its index.
    pub fn find(&self, from: usize, needle: &str) -> Option<(usize, String)> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, l)| l.contains(needle))
            .map(|(i, l)| (i, l.clone()))
    }

    /// Waits until the stream has closed (the child exited), so that every
    /// line it wrote is here.
    pub fn finish(&mut self) {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}
