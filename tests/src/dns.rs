//! A tiny authoritative DNS server on loopback UDP whose answers a test changes at run time, so
//! keel's servers-by-name can be tested without the host's resolver (which tests never use).
//!
//! [`DnsServer::set`] decides what a name answers: A records ([`Answer::A`]), SERVFAIL,
//! NXDOMAIN, or nothing at all ([`Answer::Silent`], a timeout for the asker). An A query for a
//! name not in the table gets NXDOMAIN; an AAAA query for a name in it gets an empty NOERROR
//! answer (the name exists, with no IPv6 address), whatever its A answer is, except SERVFAIL and
//! silence, which apply to both. Answers carry TTL 0.
//!
//! Written by hand (RFC 1035 §4: a 12-byte header, the question copied back, answers pointing
//! at it with a compression pointer) rather than with `hickory-proto`: A records are all it
//! needs, and the test then checks keel's resolver against a server that shares no code with it.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

/// What a name answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// These IPv4 addresses (an empty list is an empty NOERROR answer).
    A(Vec<Ipv4Addr>),
    /// RCODE 2, server failure.
    ServFail,
    /// RCODE 3, no such name.
    NxDomain,
    /// No reply: the asker times out.
    Silent,
}

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const RCODE_SERVFAIL: u16 = 2;
const RCODE_NXDOMAIN: u16 = 3;

struct Shared {
    answers: Mutex<BTreeMap<String, Answer>>,
    queries: AtomicU64,
    stop: AtomicBool,
}

/// A running DNS server; stops on drop.
pub struct DnsServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl DnsServer {
    /// Starts one on 127.0.0.1 on a free UDP port.
    pub fn start() -> Result<DnsServer> {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the test DNS server")?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = socket.local_addr()?;
        let shared =
            Arc::new(Shared { answers: Mutex::default(), queries: AtomicU64::new(0), stop: AtomicBool::new(false) });
        let state = shared.clone();
        let thread = std::thread::Builder::new().name("test-dns".into()).spawn(move || serve(&socket, &state))?;
        Ok(DnsServer { addr, shared, thread: Some(thread) })
    }

    /// Where it listens: what `[node] resolvers` names.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Makes `name` answer `answer` from now on.
    pub fn set(&self, name: &str, answer: Answer) {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.shared.answers.lock().unwrap_or_else(|p| p.into_inner()).insert(name, answer);
    }

    /// Makes `name` answer these A records.
    pub fn set_a(&self, name: &str, ips: &[Ipv4Addr]) {
        self.set(name, Answer::A(ips.to_vec()));
    }

    /// Queries received so far.
    pub fn queries(&self) -> u64 {
        self.shared.queries.load(Ordering::SeqCst)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(socket: &UdpSocket, shared: &Shared) {
    let mut buf = [0u8; 1500];
    while !shared.stop.load(Ordering::SeqCst) {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else { continue };
        shared.queries.fetch_add(1, Ordering::SeqCst);
        let answers = shared.answers.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(reply) = respond(&buf[..n], &answers) {
            let _ = socket.send_to(&reply, peer);
        }
    }
}

/// The question of a query: its name (lower case, dotted), type, and where it ends.
fn question(query: &[u8]) -> Option<(String, u16, usize)> {
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None; // compression in a question: not from a stub resolver
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    Some((labels.join("."), qtype, at + 4))
}

/// The reply to `query`, or `None` to stay silent (a timeout, or a packet that is no query).
fn respond(query: &[u8], answers: &BTreeMap<String, Answer>) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    let (name, qtype, end) = question(query)?;
    let (rcode, ips): (u16, Vec<Ipv4Addr>) = match (answers.get(&name), qtype) {
        (Some(Answer::Silent), _) => return None,
        (Some(Answer::ServFail), _) => (RCODE_SERVFAIL, vec![]),
        (Some(Answer::NxDomain) | None, _) => (RCODE_NXDOMAIN, vec![]),
        (Some(Answer::A(ips)), TYPE_A) => (0, ips.clone()),
        (Some(Answer::A(_)), TYPE_AAAA) => (0, vec![]),
        (Some(Answer::A(_)), _) => (0, vec![]),
    };
    let mut out = Vec::with_capacity(end + ips.len() * 16);
    out.extend_from_slice(&query[..2]); // id
                                        // QR, AA, the asker's RD, RA, and the rcode.
    let flags = 0x8400 | (u16::from(query[2] & 0x01) << 8) | 0x0080 | rcode;
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes()); // one question
    out.extend_from_slice(&u16::try_from(ips.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]); // no authority, no additional records
    out.extend_from_slice(&query[12..end]);
    for ip in ips {
        out.extend_from_slice(&[0xc0, 12]); // the name: a pointer to the question's
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes()); // class IN
        out.extend_from_slice(&0u32.to_be_bytes()); // TTL 0
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `name` of `qtype`, id 0x1234, RD set.
    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    }

    #[test]
    fn answers_a_records_and_failures() {
        let mut table = BTreeMap::new();
        table.insert("app.test".to_owned(), Answer::A(vec![Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)]));
        table.insert("bad.test".to_owned(), Answer::ServFail);
        table.insert("quiet.test".to_owned(), Answer::Silent);
        let q = query("App.Test", TYPE_A);
        let r = respond(&q, &table).expect("a reply");
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(r[3] & 0x0f, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 2, "two answers");
        assert_eq!(&r[r.len() - 4..], &[127, 0, 0, 3]);
        let r = respond(&query("app.test", TYPE_AAAA), &table).expect("a reply");
        assert_eq!((r[3] & 0x0f, u16::from_be_bytes([r[6], r[7]])), (0, 0));
        let r = respond(&query("bad.test", TYPE_A), &table).expect("a reply");
        assert_eq!(r[3] & 0x0f, 2);
        let r = respond(&query("other.test", TYPE_A), &table).expect("a reply");
        assert_eq!(r[3] & 0x0f, 3);
        assert_eq!(respond(&query("quiet.test", TYPE_A), &table), None);
    }
}
