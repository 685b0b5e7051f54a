use std::collections::BTreeMap;

/// One instance of a service that calls can be sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Stable identity (a registry's instance id; for a static list, the address). Two
    /// updates that carry the same id are the same endpoint: its connection is kept.
    pub id: String,
    /// Where to connect: `host:port`, or a URL such as `http://host:port`.
    pub address: String,
    /// Relative weight for the `weighted` strategy; 0 counts as 1.
    pub weight: u32,
    /// Free-form labels (zone, version, …) carried along for callers and logs.
    pub metadata: BTreeMap<String, String>,
}

impl Endpoint {
    /// An endpoint at `address` whose id is the address itself, weight 1, no metadata.
    pub fn new(address: impl Into<String>) -> Self {
        let address = address.into();
        Endpoint { id: address.clone(), address, weight: 1, metadata: BTreeMap::new() }
    }

    /// Sets the id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Sets the weight.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// The URL to connect to: `address` itself when it has a scheme, else `http://address`.
    pub fn url(&self) -> String {
        if self.address.contains("://") { self.address.clone() } else { format!("http://{}", self.address) }
    }
}

/// The full set of endpoints of a service at one moment: what resolvers produce and the
/// balancer consumes. Each update replaces the previous set; the balancer diffs them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointSet {
    /// The endpoints; ids are unique (a later duplicate replaces an earlier one).
    pub endpoints: Vec<Endpoint>,
}

impl EndpointSet {
    /// A set of the given endpoints.
    pub fn new(endpoints: Vec<Endpoint>) -> Self {
        EndpointSet { endpoints }
    }

    /// A set from addresses, each its own id, weight 1.
    pub fn from_addresses<I, A>(addresses: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<String>,
    {
        EndpointSet { endpoints: addresses.into_iter().map(Endpoint::new).collect() }
    }

    /// The number of endpoints.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }
}
