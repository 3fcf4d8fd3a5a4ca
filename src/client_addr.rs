//! Who the client is behind reverse proxies: `PATCHBAY_TRUSTED_PROXIES` lists the addresses
//! (or networks) whose `X-Forwarded-For` / `Forwarded` and `X-Forwarded-Host` headers are
//! believed. From anyone else those headers are ignored: a client cannot name itself.

use std::net::IpAddr;

use hyper::HeaderMap;
use hyper::header::{FORWARDED, HOST};

/// The TCP peer of a request (put in its extensions by the server).
#[derive(Debug, Clone, Copy)]
pub struct RemoteAddr(pub std::net::SocketAddr);

/// The proxies whose forwarding headers are believed, and which header they write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    networks: Vec<Network>,
    header: ChainHeader,
}

/// The header the trusted proxies write the chain of addresses in (`PATCHBAY_PROXY_HEADER`).
/// Only that one is read: a client could send the other one through a proxy that does not
/// touch it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ChainHeader {
    /// `X-Forwarded-For: client, proxy1, …`.
    #[default]
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1, …` (RFC 7239).
    Forwarded,
}

impl ChainHeader {
    /// `x-forwarded-for` or `forwarded`.
    pub fn parse(name: &str) -> Result<ChainHeader, String> {
        match name.trim().to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Ok(ChainHeader::XForwardedFor),
            "forwarded" => Ok(ChainHeader::Forwarded),
            other => Err(format!(
                "`{other}` is neither x-forwarded-for nor forwarded"
            )),
        }
    }
}

/// An address and how many of its leading bits a match must share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Network {
    addr: IpAddr,
    bits: u8,
}

impl Network {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let shift = 32u32.saturating_sub(u32::from(self.bits));
                let mask = u32::MAX.checked_shl(shift).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let shift = 128u32.saturating_sub(u32::from(self.bits));
                let mask = u128::MAX.checked_shl(shift).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl TrustedProxies {
    /// `10.0.0.0/8, 192.168.1.5, ::1`: addresses and networks, comma-separated; their chain
    /// of addresses in `header`.
    pub fn new(list: &str, header: ChainHeader) -> Result<TrustedProxies, String> {
        Ok(TrustedProxies {
            networks: Self::parse(list)?.networks,
            header,
        })
    }

    /// [`TrustedProxies::new`] with `X-Forwarded-For`.
    pub fn parse(list: &str) -> Result<TrustedProxies, String> {
        let mut networks = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (addr, bits) = match item.split_once('/') {
                Some((addr, bits)) => (addr, Some(bits)),
                None => (item, None),
            };
            let addr: IpAddr = addr
                .parse()
                .map_err(|_| format!("`{item}` is not an IP address or network"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let bits = match bits {
                None => max,
                Some(bits) => bits
                    .parse::<u8>()
                    .ok()
                    .filter(|b| *b <= max)
                    .ok_or(format!("`{item}`: the prefix length must be 0 to {max}"))?,
            };
            // An IPv4-mapped IPv6 entry (`::ffff:10.0.0.1`) is the IPv4 one; its prefix counts
            // the 96 bits of the mapping, which must all be there.
            let canonical = addr.to_canonical();
            let bits = match (addr, canonical) {
                (IpAddr::V6(_), IpAddr::V4(_)) => bits.checked_sub(96).ok_or(format!(
                    "`{item}`: a prefix of an IPv4-mapped address must be 96 to 128"
                ))?,
                _ => bits,
            };
            networks.push(Network {
                addr: canonical,
                bits,
            });
        }
        Ok(TrustedProxies {
            networks,
            header: ChainHeader::default(),
        })
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.networks.iter().any(|n| n.contains(ip))
    }

    /// The client's address. The peer itself, unless it is a trusted proxy: then the
    /// forwarding chain (in the configured header) is read from its end, each trusted proxy
    /// passing on to the address before it, until one that is not trusted — the client. An
    /// entry that is not an address (`unknown`, an obfuscated name) ends the walk at the last
    /// address known.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer.to_canonical();
        if !self.trusts(client) {
            return client;
        }
        let chain = forwarded_for(headers, self.header);
        for hop in chain.iter().rev() {
            let Some(ip) = parse_hop(hop) else {
                return client;
            };
            client = ip.to_canonical();
            if !self.trusts(client) {
                return client;
            }
        }
        client
    }

    /// The host the browser asked for, which the Origin rule compares with: from a trusted
    /// proxy the first `X-Forwarded-Host`, else the first `Forwarded: host=`; else `Host`.
    pub fn host(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<String> {
        if let Some(peer) = peer
            && self.trusts(peer)
        {
            let forwarded_host = headers
                .get("x-forwarded-host")
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.split(',').next())
                .map(|h| h.trim().to_string())
                .or_else(|| {
                    let first = headers.get(FORWARDED)?.to_str().ok()?.split(',').next()?;
                    first.split(';').find_map(|pair| {
                        let (key, value) = pair.trim().split_once('=')?;
                        key.eq_ignore_ascii_case("host")
                            .then(|| value.trim().trim_matches('"').to_string())
                    })
                })
                .filter(|h| !h.is_empty());
            if forwarded_host.is_some() {
                return forwarded_host;
            }
        }
        headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| h.trim().to_string())
    }
}

/// Tells the service behind patchbay who the client is, as any proxy does: `X-Forwarded-For`
/// set to `client` (replacing whatever the client sent).
pub fn set_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let value = hyper::header::HeaderValue::from_str(&client.to_string())
        .expect("an IP address is a header value");
    headers.insert("x-forwarded-for", value);
}

/// The addresses `header` lists, first (the original client) to last.
fn forwarded_for(headers: &HeaderMap, header: ChainHeader) -> Vec<String> {
    let values = |name| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
    };
    if header == ChainHeader::XForwardedFor {
        return values(hyper::header::HeaderName::from_static("x-forwarded-for"));
    }
    values(FORWARDED)
        .into_iter()
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (key, value) = pair.trim().split_once('=')?;
                key.eq_ignore_ascii_case("for")
                    .then(|| value.trim().trim_matches('"').to_string())
            })
        })
        .collect()
}

/// `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`, `[2001:db8::1]:4711`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (addr, port) = hop.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    addr.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn lists_parse_and_bad_entries_say_why() {
        let t = TrustedProxies::parse(" 10.0.0.0/8, 192.168.1.5 ,::1,fd00::/8").unwrap();
        assert!(t.trusts(ip("10.1.2.3")));
        assert!(t.trusts(ip("192.168.1.5")));
        assert!(!t.trusts(ip("192.168.1.6")));
        assert!(t.trusts(ip("::1")));
        assert!(t.trusts(ip("fd12::1")));
        assert!(t.trusts(ip("::ffff:10.9.9.9")), "an IPv4-mapped peer");
        assert!(!t.trusts(ip("11.0.0.1")));
        assert!(TrustedProxies::parse("").unwrap().is_empty());
        assert!(
            TrustedProxies::parse("0.0.0.0/0")
                .unwrap()
                .trusts(ip("8.8.8.8"))
        );
        // IPv4-mapped entries are their IPv4 addresses, never every address.
        let mapped = TrustedProxies::parse("::ffff:10.0.0.1, ::ffff:192.168.0.0/112").unwrap();
        assert!(mapped.trusts(ip("10.0.0.1")));
        assert!(mapped.trusts(ip("192.168.7.7")));
        assert!(!mapped.trusts(ip("10.0.0.2")));
        assert!(!mapped.trusts(ip("8.8.8.8")));
        for bad in [
            "10.0.0.0/33",
            "nginx",
            "10.0.0.1/x",
            "::1/129",
            "::ffff:0:0/95",
        ] {
            let e = TrustedProxies::parse(bad).unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn the_client_is_the_first_untrusted_address_from_the_end() {
        let t = TrustedProxies::parse("10.0.0.0/8").unwrap();
        let xff = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.7, 10.0.0.2")]);
        // From a trusted proxy: through another trusted hop to the client; the client's own
        // claim before it (6.6.6.6) is not believed.
        assert_eq!(t.client(ip("10.0.0.1"), &xff), ip("203.0.113.7"));
        // From anyone else the header is ignored.
        assert_eq!(t.client(ip("198.51.100.1"), &xff), ip("198.51.100.1"));
        assert_eq!(t.client(ip("10.0.0.1"), &HeaderMap::new()), ip("10.0.0.1"));
        // Only the configured header counts: a client's Forwarded passed through an
        // X-Forwarded-For proxy untouched is not believed, and the other way round.
        let forwarded = headers(&[
            (
                "forwarded",
                r#"for=192.0.2.60;proto=http, for="[2001:db8::1]:4711";by=10.0.0.1"#,
            ),
            ("x-forwarded-for", "6.6.6.6"),
        ]);
        assert_eq!(t.client(ip("10.0.0.1"), &forwarded), ip("6.6.6.6"));
        let f = TrustedProxies::new("10.0.0.0/8", ChainHeader::Forwarded).unwrap();
        assert_eq!(f.client(ip("10.0.0.1"), &forwarded), ip("2001:db8::1"));
        let unknown = headers(&[("forwarded", "for=unknown, for=10.0.0.3")]);
        assert_eq!(f.client(ip("10.0.0.1"), &unknown), ip("10.0.0.3"));
        assert!(ChainHeader::parse("X-Real-IP").is_err());
        let two_lines = headers(&[
            ("x-forwarded-for", "192.0.2.9"),
            ("x-forwarded-for", "10.0.0.5:80"),
        ]);
        assert_eq!(t.client(ip("10.0.0.1"), &two_lines), ip("192.0.2.9"));
    }

    #[test]
    fn the_forwarded_host_counts_only_from_a_trusted_proxy() {
        let t = TrustedProxies::parse("10.0.0.1").unwrap();
        let h = headers(&[
            ("host", "patchbay:8080"),
            ("x-forwarded-host", "app.example.com:8443, x"),
        ]);
        assert_eq!(
            t.host(Some(ip("10.0.0.1")), &h).as_deref(),
            Some("app.example.com:8443")
        );
        assert_eq!(
            t.host(Some(ip("10.0.0.2")), &h).as_deref(),
            Some("patchbay:8080")
        );
        assert_eq!(t.host(None, &h).as_deref(), Some("patchbay:8080"));
        let f = headers(&[
            ("host", "patchbay:8080"),
            (
                "forwarded",
                r#"for=1.2.3.4;host="app.example.com:8443";proto=https"#,
            ),
        ]);
        assert_eq!(
            t.host(Some(ip("10.0.0.1")), &f).as_deref(),
            Some("app.example.com:8443")
        );
        assert_eq!(
            t.host(Some(ip("10.0.0.2")), &f).as_deref(),
            Some("patchbay:8080")
        );
    }
}
