//! SMART on FHIR scopes (v1 and v2) and the FHIR interaction each request needs.
//!
//! Both versions are reduced to the v2 permission letters, so one comparison serves:
//! v1 `read` = `rs`, v1 `write` = `cud`, v1 `*` = `cruds`. v2 `?query` constraints are
//! parsed but such a scope never grants anything here: the gateway cannot evaluate
//! them against a request, and granting more than the token says would be worse than
//! granting less.

use http::Method;

/// Which actor a scope is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    Patient,
    User,
    System,
}

impl Context {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "patient" => Some(Context::Patient),
            "user" => Some(Context::User),
            "system" => Some(Context::System),
            _ => None,
        }
    }
}

/// v2 permission letters as a bit set: c r u d s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms(u8);

impl Perms {
    pub const C: Perms = Perms(1);
    pub const R: Perms = Perms(2);
    pub const U: Perms = Perms(4);
    pub const D: Perms = Perms(8);
    pub const S: Perms = Perms(16);
    pub const ALL: Perms = Perms(31);

    pub const fn union(self, o: Perms) -> Perms {
        Perms(self.0 | o.0)
    }
    pub fn contains(self, o: Perms) -> bool {
        self.0 & o.0 == o.0
    }

    /// v2 letters; they must appear in `cruds` order, each at most once.
    fn parse_v2(s: &str) -> Option<Perms> {
        let order = [
            ('c', Perms::C),
            ('r', Perms::R),
            ('u', Perms::U),
            ('d', Perms::D),
            ('s', Perms::S),
        ];
        let mut next = 0;
        let mut p = Perms::default();
        for ch in s.chars() {
            let i = order[next..].iter().position(|(c, _)| *c == ch)? + next;
            p = p.union(order[i].1);
            next = i + 1;
        }
        (p != Perms::default()).then_some(p)
    }
}

/// One parsed scope such as `system/Patient.read` or `system/*.cruds`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub context: Context,
    /// Resource type, or `*`.
    pub resource: String,
    pub perms: Perms,
    /// v2 `?query` constraint present (such scopes grant nothing here; see module docs).
    pub constrained: bool,
}

impl Scope {
    /// Parses a SMART resource scope; `None` for anything else (`openid`, `launch`, …).
    pub fn parse(s: &str) -> Option<Scope> {
        let (context, rest) = s.split_once('/')?;
        let context = Context::parse(context)?;
        let (rest, constrained) = match rest.split_once('?') {
            Some((r, q)) => (r, !q.is_empty()),
            None => (rest, false),
        };
        let (resource, perms) = rest.rsplit_once('.')?;
        if resource != "*" && !valid_resource_type(resource) {
            return None;
        }
        let perms = match perms {
            "read" => Perms::R.union(Perms::S),
            "write" => Perms::C.union(Perms::U).union(Perms::D),
            "*" => Perms::ALL,
            v2 => Perms::parse_v2(v2)?,
        };
        Some(Scope {
            context,
            resource: resource.to_owned(),
            perms,
            constrained,
        })
    }
}

/// FHIR resource type names: an upper-case letter then letters and digits.
fn valid_resource_type(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_uppercase())
        && b.all(|c| c.is_ascii_alphanumeric())
        && s.len() <= 64
}

/// FHIR RESTful interactions the gateway tells apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interaction {
    Capabilities,
    Read,
    Vread,
    Search,
    History,
    Create,
    Update,
    Patch,
    Delete,
    /// `$name`, at system, type or instance level.
    Operation(String),
    /// `POST /` with a batch or transaction Bundle.
    BatchOrTransaction,
    /// Not a FHIR interaction (unknown method or shape): refused by scope checks.
    Unknown,
}

/// What a request needs from the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub interaction: Interaction,
    /// Resource type, or `*` when the request is not limited to one type.
    pub resource: String,
    pub perms: Perms,
    /// Other types the request reaches besides `resource`: those the answer may carry
    /// (`_include`, `_revinclude`) need `r`, those it searches (`_has`, chained
    /// parameters) `s`; `*` when they cannot be told from the request.
    pub also: Vec<(String, Perms)>,
}

impl Requirement {
    /// Nothing to check (capability statement).
    pub fn none() -> Self {
        Requirement {
            interaction: Interaction::Capabilities,
            resource: "*".into(),
            perms: Perms::default(),
            also: Vec::new(),
        }
    }

    /// Adds what the query string asks the answer to carry besides the base type:
    /// `_include` / `_revinclude` (with `:iterate`) bring in resources of other types,
    /// and `_has` and chained parameters (`subject:Patient.name`) search other types. A
    /// gateway cannot see the answer, so the token must cover every type the request can
    /// name (SMART scopes "correspond directly to FHIR resource types"). An `_include` or
    /// a chain without a target type (`Slot:schedule`, `subject.name`) could reach any
    /// type the parameter refers to, so it needs `*`: name the target
    /// (`Slot:schedule:Schedule`, `subject:Patient.name`) to need only that type.
    pub fn with_query(self, query: Option<&str>) -> Self {
        match query {
            Some(q) => self.with_params(q.as_bytes()),
            None => self,
        }
    }

    /// [`Requirement::with_query`] for parameters in `application/x-www-form-urlencoded`
    /// form: a query string, or the body of a search by POST.
    pub fn with_params(mut self, params: &[u8]) -> Self {
        if self.perms == Perms::default() {
            return self;
        }
        // A named type, or `*` for anything that is not one.
        let one = |t: &str| {
            if valid_resource_type(t) {
                t.to_owned()
            } else {
                "*".to_owned()
            }
        };
        for (name, value) in form_urlencoded::parse(params) {
            let base = name.split(':').next().unwrap_or_default();
            match base {
                "_include" => {
                    let mut parts = value.split(':');
                    let target = parts.nth(2);
                    let t = target.map_or_else(|| "*".to_owned(), one);
                    self.need(t, Perms::R);
                }
                "_revinclude" => {
                    let source = value.split(':').next().unwrap_or_default();
                    self.need(one(source), Perms::R);
                }
                "_has" => {
                    // `_has:Observation:patient:code`, nested as `_has:A:p:_has:B:q:code`.
                    let segs: Vec<&str> = name.split(':').collect();
                    for (i, seg) in segs.iter().enumerate() {
                        if *seg == "_has" {
                            self.need(one(segs.get(i + 1).copied().unwrap_or_default()), Perms::S);
                        }
                    }
                }
                _ => {}
            }
            // A chain: each link before a '.' searches the type its reference points
            // to, named as the link's modifier or else any (`*`).
            if let Some((links, _)) = name.rsplit_once('.') {
                for link in links.split('.') {
                    let t = link.split_once(':').map_or("*", |(_, t)| t);
                    self.need(one(t), Perms::S);
                }
            }
        }
        self
    }

    /// A create's `If-None-Exist` criteria. FHIR R4 conditional create: the server
    /// searches with them, and "One Match: The server ignores the post and returns 200
    /// OK", with the match: a search that may answer with a resource. So a create with
    /// criteria also needs search and read on its type, and its parameters are checked
    /// as a query's. Any other interaction is left as it is.
    pub fn with_if_none_exist(mut self, criteria: &[u8]) -> Self {
        if self.interaction != Interaction::Create {
            return self;
        }
        self.perms = self.perms.union(Perms::R).union(Perms::S);
        // Some servers take the criteria as a whole search URL (`Patient?identifier=…`)
        // or with a leading `?`, others as parameters whatever they hold: both readings
        // are checked.
        let criteria = criteria.trim_ascii();
        let after = criteria
            .iter()
            .position(|b| *b == b'?')
            .map(|i| &criteria[i + 1..]);
        let need = self.with_params(criteria);
        match after {
            Some(params) => need.with_params(params),
            None => need,
        }
    }

    fn need(&mut self, resource: String, perms: Perms) {
        if resource == self.resource && self.perms.contains(perms) {
            return;
        }
        match self.also.iter_mut().find(|(r, _)| *r == resource) {
            Some((_, p)) => *p = p.union(perms),
            None => self.also.push((resource, perms)),
        }
    }

    /// The smallest v1-style scope that would satisfy this requirement, for
    /// `WWW-Authenticate: … scope="…"`.
    pub fn hint(&self) -> String {
        let one = |resource: &str, perms: Perms| {
            let access = if Perms::R.union(Perms::S).contains(perms) {
                "read"
            } else if Perms::C.union(Perms::U).union(Perms::D).contains(perms) {
                "write"
            } else {
                "*"
            };
            format!("system/{resource}.{access}")
        };
        let mut out = one(&self.resource, self.perms);
        for (r, p) in &self.also {
            out.push(' ');
            out.push_str(&one(r, *p));
        }
        out
    }
}

/// Maps a request to its FHIR interaction and the permissions that needs.
pub fn classify(method: &Method, path: &str) -> Requirement {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let typ = |s: &str| valid_resource_type(s).then(|| s.to_owned());
    let req = |interaction, resource: String, perms| Requirement {
        interaction,
        resource,
        perms,
        also: Vec::new(),
    };
    let read_like = |m: &Method| *m == Method::GET || *m == Method::HEAD;
    let unknown = || req(Interaction::Unknown, "*".into(), Perms::ALL);

    match segs.as_slice() {
        [] if *method == Method::POST => {
            req(Interaction::BatchOrTransaction, "*".into(), Perms::ALL)
        }
        ["metadata"] if read_like(method) => Requirement::none(),
        ["_history"] if read_like(method) => req(Interaction::History, "*".into(), Perms::S),
        [op] if op.starts_with('$') => req(
            Interaction::Operation(op[1..].to_owned()),
            "*".into(),
            op_perms(method, &op[1..]),
        ),
        [t] => match typ(t) {
            Some(t) if read_like(method) => req(Interaction::Search, t, Perms::S),
            Some(t) if *method == Method::POST => req(Interaction::Create, t, Perms::C),
            // Conditional update / patch / delete act on whatever matches the search.
            Some(t) if *method == Method::PUT => {
                req(Interaction::Update, t, Perms::U.union(Perms::S))
            }
            Some(t) if *method == Method::PATCH => {
                req(Interaction::Patch, t, Perms::U.union(Perms::S))
            }
            Some(t) if *method == Method::DELETE => {
                req(Interaction::Delete, t, Perms::D.union(Perms::S))
            }
            _ => unknown(),
        },
        // The search parameters are in the body, so the types `_include`, `_revinclude`
        // or `_has` might name are unknown here: `*` read. (The gateway reads a
        // form-encoded body and checks its parameters instead: `Gateway::token`.)
        [t, "_search"] if *method == Method::POST => match typ(t) {
            Some(t) => {
                let mut r = req(Interaction::Search, t, Perms::S);
                r.need("*".into(), Perms::R);
                r
            }
            None => unknown(),
        },
        // Not a read: an id is "Any combination of upper- or lower-case ASCII letters
        // ..., numerals ..., '-' and '.'" (FHIR R4 datatypes), so `_search` is none, and
        // servers (HAPI) answer it as the search by POST is answered.
        [t, "_search"] if read_like(method) => match typ(t) {
            Some(t) => req(Interaction::Search, t, Perms::S),
            None => unknown(),
        },
        [t, "_history"] if read_like(method) => match typ(t) {
            Some(t) => req(Interaction::History, t, Perms::S),
            None => unknown(),
        },
        [t, op] if op.starts_with('$') => match typ(t) {
            Some(t) => req(
                Interaction::Operation(op[1..].to_owned()),
                op_scope(t, &op[1..]),
                op_perms(method, &op[1..]),
            ),
            None => unknown(),
        },
        [t, _id] => match typ(t) {
            Some(t) if read_like(method) => req(Interaction::Read, t, Perms::R),
            Some(t) if *method == Method::PUT => req(Interaction::Update, t, Perms::U),
            Some(t) if *method == Method::PATCH => req(Interaction::Patch, t, Perms::U),
            Some(t) if *method == Method::DELETE => req(Interaction::Delete, t, Perms::D),
            _ => unknown(),
        },
        [t, _id, op] if op.starts_with('$') => match typ(t) {
            Some(t) => req(
                Interaction::Operation(op[1..].to_owned()),
                op_scope(t, &op[1..]),
                op_perms(method, &op[1..]),
            ),
            None => unknown(),
        },
        [t, _id, "_history"] if read_like(method) => match typ(t) {
            Some(t) => req(Interaction::History, t, Perms::R),
            None => unknown(),
        },
        [t, _id, "_history", _vid] if read_like(method) => match typ(t) {
            Some(t) => req(Interaction::Vread, t, Perms::R),
            None => unknown(),
        },
        _ => unknown(),
    }
}

/// FHIR core operations whose answer is about the type they are invoked on (or an
/// OperationOutcome) and nothing else. Any other operation on a type or instance may
/// answer with other types (`Patient/123/$everything` returns the whole compartment,
/// `$export` anything), so it needs a `*` scope.
const SAME_TYPE_OPERATIONS: [&str; 11] = [
    "validate",
    "meta",
    "meta-add",
    "meta-delete",
    "match",
    "expand",
    "validate-code",
    "lookup",
    "subsumes",
    "translate",
    "lastn",
];

/// FHIR R4 core operations with `affectsState = false` (and Bulk Data `$export`) whose
/// answer is stored data (`$everything`, `$match`, `$export`, …) or describes it
/// (`$validate` of an instance, `$meta`, `$stats`). Any operation may come by POST, so
/// these need read and search whatever the method: a write-only token must not read
/// through them. Not here: `$graphql` (by POST it may carry mutations, which create,
/// update and delete) and `$document` (its `persist` parameter stores a Bundle).
const READ_OPERATIONS: [&str; 12] = [
    "everything",
    "match",
    "lastn",
    "expand",
    "lookup",
    "validate-code",
    "subsumes",
    "translate",
    "meta",
    "validate",
    "stats",
    "export",
];

/// What an operation needs. FHIR R4 operations: "When an operation has affectsState =
/// false, and the parameters are all primitive datatypes with no extensions …, it may be
/// invoked using GET as well", so a GET only reads (and a read-only answer may be a
/// search's: `$everything`, `$match`), while a POST of an operation the gateway does not
/// know may change and return anything: every letter.
fn op_perms(method: &Method, op: &str) -> Perms {
    let read = Perms::R.union(Perms::S);
    match op {
        _ if READ_OPERATIONS.contains(&op) => read,
        // They change a resource's meta and answer with it.
        "meta-add" | "meta-delete" => Perms::R.union(Perms::U),
        // BaRS: a sender posts a message; `system/*.write` (v2 `cud`) is what it holds.
        "process-message" if *method == Method::POST => Perms::C.union(Perms::U),
        _ if *method == Method::GET || *method == Method::HEAD => read,
        _ => Perms::ALL,
    }
}

fn op_scope(resource: String, op: &str) -> String {
    if SAME_TYPE_OPERATIONS.contains(&op) {
        resource
    } else {
        "*".into()
    }
}

/// Whether the granted scopes cover the requirement. Only scopes of an allowed context
/// count; a `*` requirement needs a `*` scope.
pub fn permits(granted: &[Scope], need: &Requirement, contexts: &[Context]) -> bool {
    if need.perms == Perms::default() {
        return true;
    }
    // Permissions may come from several scopes (e.g. `Patient.r` and `Patient.s`).
    let covers = |resource: &str, perms: Perms| {
        let mut have = Perms::default();
        for s in granted {
            if s.constrained || !contexts.contains(&s.context) {
                continue;
            }
            if s.resource == "*" || (resource != "*" && s.resource == resource) {
                have = have.union(s.perms);
            }
        }
        have.contains(perms)
    };
    covers(&need.resource, need.perms) && need.also.iter().all(|(r, p)| covers(r, *p))
}

/// Splits an RFC 6749 `scope` string and keeps the SMART resource scopes.
pub fn parse_scope_list(scope: &str) -> Vec<Scope> {
    scope.split(' ').filter_map(Scope::parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_grammar_v1_and_v2() {
        let ok: &[(&str, Context, &str, Perms)] = &[
            ("system/*.*", Context::System, "*", Perms::ALL),
            (
                "system/Patient.read",
                Context::System,
                "Patient",
                Perms::R.union(Perms::S),
            ),
            ("user/*.read", Context::User, "*", Perms::R.union(Perms::S)),
            (
                "patient/Observation.write",
                Context::Patient,
                "Observation",
                Perms::C.union(Perms::U).union(Perms::D),
            ),
            (
                "system/Patient.rs",
                Context::System,
                "Patient",
                Perms::R.union(Perms::S),
            ),
            ("system/*.cruds", Context::System, "*", Perms::ALL),
            ("system/Slot.s", Context::System, "Slot", Perms::S),
            (
                "system/ServiceRequest.cu",
                Context::System,
                "ServiceRequest",
                Perms::C.union(Perms::U),
            ),
        ];
        for (s, ctx, res, perms) in ok {
            let p = Scope::parse(s).unwrap_or_else(|| panic!("{s} should parse"));
            assert_eq!(
                (p.context, p.resource.as_str(), p.perms, p.constrained),
                (*ctx, *res, *perms, false),
                "{s}"
            );
        }
        for bad in [
            "openid",
            "launch/patient",
            "system",
            "system/",
            "system/Patient",
            "system/Patient.",
            "admin/Patient.read",
            "system/patient.read",
            "system/Patient.sr",
            "system/Patient.rr",
            "system/Patient.x",
            "system/Pat-ient.read",
            "system/*.readwrite",
            "",
        ] {
            assert_eq!(Scope::parse(bad), None, "{bad} must not parse");
        }
        let c = Scope::parse("system/Observation.rs?category=laboratory").unwrap();
        assert!(c.constrained);
    }

    #[test]
    fn interaction_mapping_table() {
        use Interaction as I;
        let g = Method::GET;
        let cases: Vec<(Method, &str, Interaction, &str, Perms)> = vec![
            (
                g.clone(),
                "/metadata",
                I::Capabilities,
                "*",
                Perms::default(),
            ),
            (
                g.clone(),
                "/Patient/9000000009",
                I::Read,
                "Patient",
                Perms::R,
            ),
            (
                g.clone(),
                "/Patient/1/_history/2",
                I::Vread,
                "Patient",
                Perms::R,
            ),
            (
                g.clone(),
                "/Patient/1/_history",
                I::History,
                "Patient",
                Perms::R,
            ),
            (
                g.clone(),
                "/Patient/_history",
                I::History,
                "Patient",
                Perms::S,
            ),
            (g.clone(), "/_history", I::History, "*", Perms::S),
            (g.clone(), "/Patient", I::Search, "Patient", Perms::S),
            (
                Method::POST,
                "/Patient/_search",
                I::Search,
                "Patient",
                Perms::S,
            ),
            (
                g.clone(),
                "/Patient/_search",
                I::Search,
                "Patient",
                Perms::S,
            ),
            (Method::POST, "/Patient", I::Create, "Patient", Perms::C),
            (Method::PUT, "/Patient/1", I::Update, "Patient", Perms::U),
            (
                Method::PUT,
                "/Patient",
                I::Update,
                "Patient",
                Perms::U.union(Perms::S),
            ),
            (Method::PATCH, "/Patient/1", I::Patch, "Patient", Perms::U),
            (Method::DELETE, "/Patient/1", I::Delete, "Patient", Perms::D),
            (
                Method::DELETE,
                "/Patient",
                I::Delete,
                "Patient",
                Perms::D.union(Perms::S),
            ),
            (Method::POST, "/", I::BatchOrTransaction, "*", Perms::ALL),
            (
                Method::POST,
                "/$process-message",
                I::Operation("process-message".into()),
                "*",
                Perms::C.union(Perms::U),
            ),
            // The compartment: every type, so `*`.
            (
                g.clone(),
                "/Patient/1/$everything",
                I::Operation("everything".into()),
                "*",
                Perms::R.union(Perms::S),
            ),
            (
                g.clone(),
                "/Patient/$everything",
                I::Operation("everything".into()),
                "*",
                Perms::R.union(Perms::S),
            ),
            (
                Method::POST,
                "/Group/1/$export",
                I::Operation("export".into()),
                "*",
                Perms::R.union(Perms::S),
            ),
            (
                Method::POST,
                "/Patient/1/$validate",
                I::Operation("validate".into()),
                "Patient",
                Perms::R.union(Perms::S),
            ),
            (
                Method::POST,
                "/Patient/$match",
                I::Operation("match".into()),
                "Patient",
                Perms::R.union(Perms::S),
            ),
            (
                Method::POST,
                "/$graphql",
                I::Operation("graphql".into()),
                "*",
                Perms::ALL,
            ),
            (
                g.clone(),
                "/$graphql",
                I::Operation("graphql".into()),
                "*",
                Perms::R.union(Perms::S),
            ),
            (
                Method::POST,
                "/Patient/1/$meta-add",
                I::Operation("meta-add".into()),
                "Patient",
                Perms::R.union(Perms::U),
            ),
            (
                Method::POST,
                "/Patient/1/$merge",
                I::Operation("merge".into()),
                "*",
                Perms::ALL,
            ),
            (g.clone(), "/patient/1", I::Unknown, "*", Perms::ALL),
            (Method::OPTIONS, "/Patient/1", I::Unknown, "*", Perms::ALL),
            (g.clone(), "/a/b/c/d/e", I::Unknown, "*", Perms::ALL),
        ];
        for (m, p, i, r, perms) in cases {
            let got = classify(&m, p);
            assert_eq!(
                (got.interaction, got.resource.as_str(), got.perms),
                (i, r, perms),
                "{m} {p}"
            );
        }
    }

    #[test]
    fn permits_table() {
        let sys = [Context::System];
        let need = |m: Method, p: &str| classify(&m, p);
        let s = |list: &str| parse_scope_list(list);
        let cases: &[(&str, Method, &str, bool)] = &[
            ("system/*.*", Method::GET, "/Patient/1", true),
            ("system/*.*", Method::POST, "/$process-message", true),
            ("system/*.*", Method::POST, "/", true),
            ("system/Patient.read", Method::GET, "/Patient/1", true),
            ("system/Patient.read", Method::GET, "/Patient", true),
            ("system/Patient.read", Method::POST, "/Patient", false),
            ("system/Patient.read", Method::GET, "/Observation/1", false),
            (
                "system/Patient.read",
                Method::POST,
                "/$process-message",
                false,
            ),
            ("system/Patient.rs", Method::GET, "/Patient", true),
            ("system/Patient.r", Method::GET, "/Patient", false),
            (
                "system/Patient.r system/Patient.s",
                Method::GET,
                "/Patient",
                true,
            ),
            ("system/*.cud", Method::POST, "/$process-message", true),
            ("system/*.write", Method::DELETE, "/Slot/1", true),
            ("system/Patient.*", Method::POST, "/", false),
            ("user/*.*", Method::GET, "/Patient/1", false),
            ("patient/*.read", Method::GET, "/Patient/1", false),
            (
                "system/Observation.rs?category=lab",
                Method::GET,
                "/Observation",
                false,
            ),
            ("openid profile", Method::GET, "/Patient/1", false),
            ("", Method::GET, "/metadata", true),
            ("system/*.*", Method::OPTIONS, "/Patient/1", true),
            ("system/Patient.*", Method::OPTIONS, "/Patient/1", false),
        ];
        for (granted, m, p, want) in cases {
            assert_eq!(
                permits(&s(granted), &need(m.clone(), p), &sys),
                *want,
                "{granted:?} {m} {p}"
            );
        }
        // Allowing the user context makes user scopes count.
        assert!(permits(
            &s("user/*.read"),
            &need(Method::GET, "/Patient/1"),
            &[Context::System, Context::User]
        ));
    }

    /// SMART App Launch: "SMART on FHIR defines OAuth2 access scopes that correspond
    /// directly to FHIR resource types." A request whose answer carries other types
    /// (`_include`, `_revinclude`, a compartment operation) needs their scopes too, and
    /// `_has` searches the type it names.
    #[test]
    fn included_types_need_their_own_scopes() {
        let sys = [Context::System];
        let ok = |granted: &str, m: Method, pq: &str| {
            let (path, query) = match pq.split_once('?') {
                Some((p, q)) => (p, Some(q)),
                None => (pq, None),
            };
            permits(
                &parse_scope_list(granted),
                &classify(&m, path).with_query(query),
                &sys,
            )
        };
        let get = Method::GET;
        let cases: &[(&str, &str, bool)] = &[
            ("system/Patient.read", "/Patient?name=smith", true),
            (
                "system/Patient.read",
                "/Patient?_revinclude=Observation:subject",
                false,
            ),
            (
                "system/Patient.read",
                "/Patient?_revinclude%3Aiterate=Observation%3Asubject",
                false,
            ),
            (
                "system/Patient.read system/Observation.read",
                "/Patient?_revinclude=Observation:subject",
                true,
            ),
            // Read is what an included resource needs; search alone is not reading.
            (
                "system/Patient.read system/Observation.s",
                "/Patient?_revinclude=Observation:subject",
                false,
            ),
            // A target type named: only that type.
            (
                "system/Slot.read system/Schedule.read",
                "/Slot?_include=Slot:schedule:Schedule",
                true,
            ),
            // No target type: whatever `schedule` refers to, so `*`.
            (
                "system/Slot.read system/Schedule.read",
                "/Slot?_include=Slot:schedule",
                false,
            ),
            ("system/*.read", "/Slot?_include=Slot:schedule", true),
            (
                "system/Slot.read system/Schedule.read",
                "/Slot?_include=Slot:schedule:Schedule&_include:iterate=Schedule:actor",
                false,
            ),
            ("system/Slot.read", "/Slot?_include=*", false),
            (
                "system/Patient.read",
                "/Patient?_has:Observation:patient:code=1234-5",
                false,
            ),
            (
                "system/Patient.read system/Observation.s",
                "/Patient?_has:Observation:patient:code=1234-5",
                true,
            ),
            (
                "system/Patient.read system/Observation.s",
                "/Patient?_has:Observation:patient:_has:AuditEvent:entity:agent=x",
                false,
            ),
            (
                "system/Patient.read",
                "/Patient/9000000009/$everything",
                false,
            ),
            ("system/Patient.read", "/Patient/$everything", false),
            ("system/*.read", "/Patient/9000000009/$everything", true),
            ("system/Observation.read", "/Observation/$lastn", true),
            ("system/Patient.read", "/Patient/_search", false),
            ("system/*.read", "/Patient/_search", true),
            // FHIR R4 search §3.1.1.4.13: reference parameters may be "chained by
            // appending them with a period (.) followed by the name of a search
            // parameter defined for the target resource": the target type is searched.
            (
                "system/Observation.read",
                "/Observation?subject:Patient.name=peter",
                false,
            ),
            (
                "system/Observation.read system/Patient.s",
                "/Observation?subject:Patient.name=peter",
                true,
            ),
            // No type modifier: any type `subject` refers to.
            (
                "system/Observation.read system/Patient.s",
                "/Observation?subject.name=peter",
                false,
            ),
            (
                "system/Observation.read system/*.s",
                "/Observation?subject.name=peter",
                true,
            ),
            (
                "system/Observation.read system/Patient.s",
                "/Observation?subject:Patient.organization:Organization.name=x",
                false,
            ),
            (
                "system/Observation.read system/Patient.s system/Organization.s",
                "/Observation?subject:Patient.organization:Organization.name:exact=x",
                true,
            ),
            // A modifier that is not a type on the link: `*`.
            (
                "system/Observation.read system/Patient.s",
                "/Observation?subject%3Aidentifier.name=x",
                false,
            ),
            // The capability statement needs nothing, whatever its query says.
            ("", "/metadata?_include=*", true),
        ];
        for (granted, pq, want) in cases {
            let m = if pq.ends_with("/_search") {
                Method::POST
            } else {
                get.clone()
            };
            assert_eq!(ok(granted, m, pq), *want, "{granted:?} {pq}");
        }
        let need = classify(&Method::GET, "/Patient").with_query(Some(
            "_revinclude=Observation:subject&_include=Patient:organization:Organization",
        ));
        assert_eq!(
            need.hint(),
            "system/Patient.read system/Observation.read system/Organization.read"
        );
    }

    /// FHIR R4 datatypes: an id is "Any combination of upper- or lower-case ASCII
    /// letters ('A'..'Z', and 'a'..'z', numerals ('0'..'9'), '-' and '.', with a length
    /// limit of 64 characters", so `GET /Patient/_search` reads no resource: it is the
    /// search that HAPI answers, and needs search (`s`) and its parameters' types.
    #[test]
    fn get_type_search_is_a_search() {
        let sys = [Context::System];
        let ok = |granted: &str, pq: &str| {
            let (path, query) = pq.split_once('?').unwrap_or((pq, ""));
            let need = classify(&Method::GET, path).with_query(Some(query));
            permits(&parse_scope_list(granted), &need, &sys)
        };
        assert!(!ok("system/Patient.r", "/Patient?name=smith"));
        assert!(!ok("system/Patient.r", "/Patient/_search?name=smith"));
        assert!(ok("system/Patient.s", "/Patient/_search?name=smith"));
        assert!(!ok(
            "system/Patient.s",
            "/Patient/_search?_has:Observation:patient:code=1234-5"
        ));
        assert!(ok(
            "system/Patient.s system/Observation.s",
            "/Patient/_search?_has:Observation:patient:code=1234-5"
        ));
        assert!(!ok(
            "system/Patient.s",
            "/Patient/_search?_revinclude=Observation:subject"
        ));
    }

    /// FHIR R4 operations: "When an operation has affectsState = false, and the
    /// parameters are all primitive datatypes with no extensions (as is the case with the
    /// example above), it may be invoked using GET as well", the example being
    /// `POST http://fhir.someserver.org/fhir/Patient/1/$everything`. So the method does not
    /// say whether an operation reads: one that reads needs read by POST as by GET.
    #[test]
    fn operations_by_post_need_what_they_read() {
        let sys = [Context::System];
        let ok = |granted: &str, m: Method, path: &str| {
            permits(&parse_scope_list(granted), &classify(&m, path), &sys)
        };
        let cases: &[(&str, &str, bool)] = &[
            ("system/*.write", "/Patient/1/$everything", false),
            ("system/*.cu", "/Patient/1/$everything", false),
            ("system/*.read", "/Patient/1/$everything", true),
            ("system/Patient.cu", "/Patient/$match", false),
            ("system/Patient.rs", "/Patient/$match", true),
            ("system/*.cu", "/$export", false),
            ("system/*.read", "/$export", true),
            ("system/Observation.cud", "/Observation/$lastn", false),
            ("system/ValueSet.cu", "/ValueSet/$expand", false),
            // By POST, GraphQL may carry mutations (create, update, delete) as well as
            // queries: every letter.
            ("system/*.cu", "/$graphql", false),
            ("system/*.read", "/$graphql", false),
            ("system/*.*", "/$graphql", true),
            // An operation the gateway does not know may change and return anything.
            ("system/*.write", "/Patient/1/$merge", false),
            ("system/*.read", "/Patient/1/$merge", false),
            ("system/*.cruds", "/Patient/1/$merge", true),
            // `$meta-add` changes the meta and answers with it.
            ("system/Patient.u", "/Patient/1/$meta-add", false),
            ("system/Patient.ru", "/Patient/1/$meta-add", true),
            // BaRS senders post messages with write scopes, as before.
            ("system/*.write", "/$process-message", true),
            ("system/*.cud", "/$process-message", true),
            ("system/*.read", "/$process-message", false),
        ];
        for (granted, path, want) in cases {
            assert_eq!(
                ok(granted, Method::POST, path),
                *want,
                "{granted:?} POST {path}"
            );
        }
        // By GET the same operations read, and a write-only token is refused.
        for path in ["/Patient/1/$everything", "/$graphql", "/Patient/1/$merge"] {
            assert!(!ok("system/*.write", Method::GET, path), "GET {path}");
            assert!(ok("system/*.read", Method::GET, path), "GET {path}");
        }
    }

    /// FHIR R4 §3.1.0.8.1 conditional create: "the server performs a search as
    /// specified using its standard search facilities for the resource type" with the
    /// `If-None-Exist` parameters, and on "One Match: The server ignores the post and
    /// returns 200 OK". So the criteria are a search, and the match may be answered.
    #[test]
    fn conditional_create_is_a_search_too() {
        let sys = [Context::System];
        let ok = |granted: &str, criteria: &str| {
            let need = classify(&Method::POST, "/Patient").with_if_none_exist(criteria.as_bytes());
            permits(&parse_scope_list(granted), &need, &sys)
        };
        let has = "_has:Observation:patient:code=http://loinc.org|1234-5";
        assert!(!ok("system/Patient.c", "identifier=x"));
        assert!(!ok("system/Patient.cs", "identifier=x"));
        assert!(ok("system/Patient.crs", "identifier=x"));
        assert!(!ok("system/Patient.crs", has));
        assert!(ok("system/Patient.crs system/Observation.s", has));
        // The parameters after a `?` are checked, and so is the whole.
        for wrapped in [
            format!("?{has}"),
            format!("Patient?{has}"),
            format!(" {has} "),
            format!("{has}?x=y"),
        ] {
            assert!(!ok("system/Patient.crs", &wrapped), "{wrapped}");
        }
        // A create without criteria, and other interactions, are unchanged.
        let plain = classify(&Method::POST, "/Patient");
        assert_eq!(plain.clone().with_if_none_exist(b""), {
            let mut p = plain;
            p.perms = Perms::C.union(Perms::R).union(Perms::S);
            p
        });
        let read = classify(&Method::GET, "/Patient/1");
        assert_eq!(read.clone().with_if_none_exist(has.as_bytes()), read);
    }

    #[test]
    fn hint_names_the_scope_to_ask_for() {
        assert_eq!(
            classify(&Method::GET, "/Patient/1").hint(),
            "system/Patient.read"
        );
        assert_eq!(classify(&Method::POST, "/Slot").hint(), "system/Slot.write");
        assert_eq!(classify(&Method::POST, "/").hint(), "system/*.*");
    }
}
