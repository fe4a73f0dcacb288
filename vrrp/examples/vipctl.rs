//! `vipctl`: drives one [`NetlinkAnnouncer`] call from the command line, so the netns tests (and
//! an operator in the lab) can exercise the real netlink + ARP code inside a namespace with
//! `ip netns exec NS vipctl ...` — the workspace forbids `unsafe`, so tests cannot `setns` a
//! thread themselves.
//!
//! VIP is IPv4 (`10.0.0.100`) or IPv6 (`fd00::100`); the announcement follows the family.
//!
//! ```text
//! vipctl check      IFACE VIP   # NetlinkAnnouncer::new only: interface, MAC, capabilities
//! vipctl claim      IFACE VIP [--count N] [--interval-ms MS] [--lifetime SECS]
//! vipctl release    IFACE VIP
//! vipctl step-aside IFACE VIP   # a hand-over: VIP onto lo for 30 s, off IFACE
//! vipctl announce   IFACE VIP [--count N] [--interval-ms MS]
//! vipctl holds      IFACE VIP   # prints true or false
//! vipctl probe      IP          # one UDP datagram to IP:9, so the kernel resolves IP's MAC
//! vipctl serve      PORT TEXT [--for-ms MS]   # TCP on [::]:PORT, answers each connection
//!                                             # with TEXT; prints "listening" once bound
//! vipctl connect    IP PORT [--timeout-ms MS] # prints what the server at IP:PORT answers
//! ```
//!
//! `serve` and `connect` are lab helpers: they show which host answers for the VIP.
//!
//! Exit status 0 on success; 1 with `error: ...` on stderr otherwise.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{bail, Context};
use keel_vrrp::{NetlinkAnnouncer, VipAnnouncer, VipConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const USAGE: &str = "usage: vipctl check|claim|release|step-aside|announce|holds IFACE VIP [--count N] \
     [--interval-ms MS] [--lifetime SECS]\n       vipctl probe IP\n       vipctl serve PORT TEXT [--for-ms MS]\n       \
     vipctl connect IP PORT [--timeout-ms MS]";
/// How long `serve` runs unless told otherwise: it must never outlive the test that started it
/// by much, even if that test forgets to kill it.
const DEFAULT_SERVE: Duration = Duration::from_secs(60);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(error) = run(std::env::args().skip(1).collect()).await {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

async fn run(args: Vec<String>) -> anyhow::Result<()> {
    let Some(command) = args.first() else { bail!("{USAGE}") };
    match command.as_str() {
        "probe" => {
            let ip: IpAddr = args.get(1).context(USAGE)?.parse().context("probe address")?;
            let local = if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let socket = UdpSocket::bind(local)?;
            socket.send_to(b"keel-probe", (ip, 9)).context("sending the probe")?;
            return Ok(());
        }
        "serve" => return serve(&args[1..]).await,
        "connect" => return connect(&args[1..]).await,
        _ => {}
    }
    let (Some(interface), Some(address)) = (args.get(1), args.get(2)) else { bail!("{USAGE}") };
    let mut config = VipConfig::new(address, interface.as_str())?;
    let mut rest = args[3..].iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--count" => config.arp_count = value.parse().context("--count")?,
            "--interval-ms" => config.arp_interval = Duration::from_millis(value.parse().context("--interval-ms")?),
            "--lifetime" => config.lifetime = Some(Duration::from_secs(value.parse().context("--lifetime")?)),
            other => bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    let announcer = NetlinkAnnouncer::new(config).await?;
    match command.as_str() {
        "check" => {}
        "claim" => announcer.claim().await?,
        "release" => announcer.release().await?,
        "step-aside" => announcer.step_aside().await?,
        "announce" => announcer.announce().await?,
        "holds" => println!("{}", announcer.holds().await?),
        other => bail!("unknown command {other}\n{USAGE}"),
    }
    Ok(())
}

/// Looks up `--name VALUE` after the positional arguments.
fn flag(rest: &[String], name: &str) -> anyhow::Result<Option<Duration>> {
    match rest.iter().position(|a| a == name) {
        None => Ok(None),
        Some(at) => {
            let value = rest.get(at + 1).with_context(|| format!("{name} needs a value"))?;
            Ok(Some(Duration::from_millis(value.parse().with_context(|| name.to_string())?)))
        }
    }
}

/// Answers every connection on `[::]:PORT` (IPv4 too: the socket is dual-stack) with TEXT,
/// whichever local address it was made to — the VIP on the interface or on `lo` alike.
async fn serve(args: &[String]) -> anyhow::Result<()> {
    let (Some(port), Some(text)) = (args.first(), args.get(1)) else { bail!("{USAGE}") };
    let port: u16 = port.parse().context("serve port")?;
    let run_for = flag(&args[2..], "--for-ms")?.unwrap_or(DEFAULT_SERVE);
    let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).await.context("binding [::]")?;
    println!("listening");
    let answer = async {
        loop {
            let (mut stream, _) = listener.accept().await?;
            // One failed client must not end the server the test relies on.
            let _ = stream.write_all(text.as_bytes()).await;
        }
    };
    match tokio::time::timeout(run_for, answer).await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}

/// Connects to IP:PORT and prints everything the server says before it closes.
async fn connect(args: &[String]) -> anyhow::Result<()> {
    let (Some(ip), Some(port)) = (args.first(), args.get(1)) else { bail!("{USAGE}") };
    let ip: IpAddr = ip.parse().context("connect address")?;
    let to = SocketAddr::new(ip, port.parse().context("connect port")?);
    let timeout = flag(&args[2..], "--timeout-ms")?.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let exchange = async {
        let mut stream = TcpStream::connect(to).await.with_context(|| format!("connecting to {to}"))?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.with_context(|| format!("reading from {to}"))?;
        anyhow::Ok(answer)
    };
    let answer =
        tokio::time::timeout(timeout, exchange).await.with_context(|| format!("{to}: no answer in {timeout:?}"))??;
    println!("{answer}");
    Ok(())
}
