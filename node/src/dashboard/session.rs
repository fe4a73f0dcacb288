//! Browser sign-in for the admin address: the admin token entered once in a form becomes a
//! session cookie, so the dashboard opens in a browser on a remote admin address where a
//! `Bearer` header cannot be typed.
//!
//! The cookie (`keel_session`) is `HttpOnly` (no script reads it) and `SameSite=Strict` (no
//! other site's page sends it); its value is 32 random bytes from the TLS stack's CSPRNG, kept
//! here with an expiry ([`TTL`]). A state-changing request authenticated by the cookie must
//! also carry the `X-Keel-Request` header and, when it has an `Origin`, come from this very
//! address: a cross-site form cannot set the header, and a cross-site script cannot send it
//! without a CORS preflight this API never grants. The API keeps accepting `Bearer`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Cookie name.
pub const COOKIE: &str = "keel_session";
/// Header a cookie-authenticated action must carry.
pub const ACTION_HEADER: &str = "x-keel-request";
/// How long a session lasts.
pub const TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once; signing in past it ends the oldest.
pub const MAX_SESSIONS: usize = 256;

/// The signed-in sessions of one node.
#[derive(Default)]
pub struct Sessions {
    live: Mutex<HashMap<String, Instant>>,
}

impl Sessions {
    /// Opens a session; `None` when the system has no randomness to give (then no cookie).
    pub fn open(&self) -> Option<String> {
        let mut raw = [0u8; 32];
        rustls::crypto::ring::default_provider().secure_random.fill(&mut raw).ok()?;
        let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        live.retain(|_, expires| *expires > now);
        if live.len() >= MAX_SESSIONS {
            if let Some(oldest) = live.iter().min_by_key(|(_, e)| **e).map(|(k, _)| k.clone()) {
                live.remove(&oldest);
            }
        }
        live.insert(id.clone(), now + TTL);
        Some(id)
    }

    /// Whether `id` is a live session.
    pub fn valid(&self, id: &str) -> bool {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.get(id).is_some_and(|expires| *expires > Instant::now())
    }

    /// Ends a session.
    pub fn close(&self, id: &str) {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }
}

/// The session id in a `Cookie` header value, if any.
pub fn from_cookie_header(value: &str) -> Option<&str> {
    value.split(';').filter_map(|c| c.trim().split_once('=')).find(|(k, _)| *k == COOKIE).map(|(_, v)| v)
}

/// `Set-Cookie` for a new session.
pub fn set_cookie(id: &str) -> String {
    format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}", TTL.as_secs())
}

/// `Set-Cookie` that ends the session in the browser.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_open_check_and_close() {
        let s = Sessions::default();
        let id = s.open().unwrap();
        assert_eq!(id.len(), 64);
        assert!(s.valid(&id));
        assert!(!s.valid("nope"));
        s.close(&id);
        assert!(!s.valid(&id));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        assert_eq!(from_cookie_header("a=1; keel_session=abc; b=2"), Some("abc"));
        assert_eq!(from_cookie_header("a=1"), None);
        assert!(set_cookie("x").contains("HttpOnly; SameSite=Strict"));
    }
}
