//! `vipctl`: drives one [`NetlinkAnnouncer`] call from the command line, so the netns tests (and
//! an operator in the lab) can exercise the real netlink + ARP code inside a namespace with
//! `ip netns exec NS vipctl ...` — the workspace forbids `unsafe`, so tests cannot `setns` a
//! thread themselves.
//!
//! ```text
//! vipctl check    IFACE VIP     # NetlinkAnnouncer::new only: interface, MAC, capabilities
//! vipctl claim    IFACE VIP [--count N] [--interval-ms MS] [--lifetime SECS]
//! vipctl release  IFACE VIP
//! vipctl announce IFACE VIP [--count N] [--interval-ms MS]
//! vipctl holds    IFACE VIP     # prints true or false
//! vipctl probe    IP            # sends one UDP datagram to IP:9, so the kernel ARPs for it
//! ```
//!
//! Exit status 0 on success; 1 with `error: ...` on stderr otherwise.

use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use anyhow::{bail, Context};
use keel_vrrp::{NetlinkAnnouncer, VipAnnouncer, VipConfig};

const USAGE: &str = "usage: vipctl check|claim|release|announce|holds IFACE VIP [--count N] [--interval-ms MS] \
     [--lifetime SECS]\n       vipctl probe IP";

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(error) = run(std::env::args().skip(1).collect()).await {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

async fn run(args: Vec<String>) -> anyhow::Result<()> {
    let Some(command) = args.first() else { bail!("{USAGE}") };
    if command == "probe" {
        let ip: Ipv4Addr = args.get(1).context(USAGE)?.parse().context("probe address")?;
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.send_to(b"keel-probe", (ip, 9)).context("sending the probe")?;
        return Ok(());
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
        "announce" => announcer.announce().await?,
        "holds" => println!("{}", announcer.holds().await?),
        other => bail!("unknown command {other}\n{USAGE}"),
    }
    Ok(())
}
