//! Shutdown: a broadcast "stop now" shared by the accept loop, every
//! connection and the embedding program (its own module so the connection
//! and the server both use it without depending on each other).

use std::sync::Arc;

use tokio::sync::watch;

/// A broadcast "stop now" shared by the accept loop and every connection.
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
    rx: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        let (tx, rx) = watch::channel(false);
        Shutdown {
            tx: Arc::new(tx),
            rx,
        }
    }

    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once [`Shutdown::trigger`] has been called (at once if it was).
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        // The sender lives as long as any clone of `self`, so this only
        // returns Err if it was dropped, which cannot happen while we hold one.
        let _ = rx.wait_for(|stop| *stop).await;
    }
}
