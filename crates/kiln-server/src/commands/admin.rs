//! `kiln tenants | keys | prices | usage`: the platform's administration on
//! the database directly, with the same rules as the `/api` routes. A
//! running server sees each change within its key-cache poll (a quarter of a
//! second), so `kiln keys revoke` locks a key out of every replica at once.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use kiln_store::accounts::{Limits, NewKey, NewTenant, Role, Tenant, TenantUpdate};
use kiln_store::billing::{CreditKind, NewCredit};
use kiln_store::money::{Money, Prices};
use std::sync::Arc;

use kiln_store::Database;

use crate::api::admin::{parse_usage_query, totals, usage_csv, UsageParamsView};
use crate::cli::HomeArgs;
use crate::config::env;

/// Where the database is: `--database`, else `$KILN_DATABASE`, else
/// `kiln.db` in the home directory.
#[derive(Debug, Args)]
pub struct DbArgs {
    /// SQLite file or postgres:// URL [env: KILN_DATABASE] (default $KILN_HOME/kiln.db).
    #[arg(long, value_name = "PATH", global = true)]
    pub database: Option<PathBuf>,
    #[command(flatten)]
    pub home: HomeArgs,
}

impl DbArgs {
    fn open(&self) -> anyhow::Result<Arc<dyn Database>> {
        let path = self
            .database
            .clone()
            .or_else(|| std::env::var_os(env::KILN_DATABASE).map(PathBuf::from))
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| kiln_store::default_db_path(&self.home.resolve()));
        kiln_store::open_database(&path).with_context(|| {
            format!(
                "cannot open the database {}",
                crate::serve::database_label(&path)
            )
        })
    }
}

/// A limit given on the command line: a number, or `none` to clear it.
/// A limit given on the command line: a value, or `none` to remove it.
/// (A field of type `Option<Option<T>>` would make clap expect its parser
/// to return `T`.)
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OrNone<T>(Option<T>);

impl<T: Copy> OrNone<T> {
    pub fn value(self) -> Option<T> {
        self.0
    }
}

fn optional<T: std::str::FromStr>(text: &str) -> Result<OrNone<T>, String> {
    if text.eq_ignore_ascii_case("none") {
        return Ok(OrNone(None));
    }
    text.parse()
        .map(|v| OrNone(Some(v)))
        .map_err(|_| format!("`{text}` is not a number (or `none`)"))
}

fn money(text: &str) -> Result<Money, String> {
    Money::parse(text)
}

fn optional_money(text: &str) -> Result<OrNone<Money>, String> {
    if text.eq_ignore_ascii_case("none") {
        Ok(OrNone(None))
    } else {
        Money::parse(text).map(|m| OrNone(Some(m)))
    }
}

#[derive(Debug, Args)]
pub struct TenantsArgs {
    #[command(subcommand)]
    pub command: TenantsCommand,
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, Subcommand)]
pub enum TenantsCommand {
    /// List tenants with their balances and limits.
    List,
    /// Create a tenant.
    Create {
        name: String,
        /// Monthly spending limit in the platform currency.
        #[arg(long, value_parser = money)]
        monthly_limit: Option<Money>,
        /// Requests per minute.
        #[arg(long)]
        rpm: Option<u32>,
        /// Tokens per minute (prompt plus max_tokens).
        #[arg(long)]
        tpm: Option<u32>,
    },
    /// Change a tenant's name, limits, or suspend it.
    Update {
        /// Tenant name or id.
        tenant: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, conflicts_with = "enable")]
        disable: bool,
        #[arg(long)]
        enable: bool,
        /// A limit, or `none` to remove it.
        #[arg(long, value_parser = optional_money)]
        monthly_limit: Option<OrNone<Money>>,
        #[arg(long, value_parser = optional::<u32>)]
        rpm: Option<OrNone<u32>>,
        #[arg(long, value_parser = optional::<u32>)]
        tpm: Option<OrNone<u32>>,
    },
    /// Add prepaid credit, a grant, or an adjustment to a balance.
    Credit {
        /// Tenant name or id.
        tenant: String,
        /// Amount in the platform currency (an adjustment may be negative).
        #[arg(allow_hyphen_values = true, value_parser = money)]
        amount: Money,
        #[arg(long, default_value = "prepaid")]
        kind: String,
        #[arg(long, default_value = "")]
        note: String,
        /// Credit this key's own balance instead of the tenant's.
        #[arg(long)]
        key: Option<String>,
    },
    /// Show a tenant's (or one of its keys') balance, reservations and spend.
    Budget {
        tenant: String,
        #[arg(long)]
        key: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub command: KeysCommand,
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a key; its secret is printed once.
    Create {
        /// Tenant name or id.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        name: String,
        /// member, tenant_admin or platform_admin.
        #[arg(long, default_value = "member")]
        role: String,
        /// Comma-separated models the key may use (default: all).
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        #[arg(long)]
        expires_in_days: Option<i64>,
        #[arg(long, value_parser = money)]
        monthly_limit: Option<Money>,
        #[arg(long)]
        rpm: Option<u32>,
        #[arg(long)]
        tpm: Option<u32>,
        /// Scheduling priority of its requests, -100 (background) to 100; a
        /// request may ask for less, never more.
        #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
        priority: i32,
        /// A knowledge-base group the key belongs to (repeatable): documents
        /// restricted to it become visible to the key.
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
    },
    /// List keys (never their secrets).
    List {
        /// Only this tenant's (name or id).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a key; every server refuses it within a second.
    Revoke { id: String },
    /// Give a key a new secret (printed once); the old one stops working.
    Rotate { id: String },
}

#[derive(Debug, Args)]
pub struct PricesArgs {
    #[command(subcommand)]
    pub command: PricesCommand,
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, Subcommand)]
pub enum PricesCommand {
    /// List model prices (per million tokens).
    List,
    /// Set a model's prices per million tokens.
    Set {
        model: String,
        #[arg(long, value_parser = money)]
        input: Money,
        /// Prompt tokens served from a prefix cache (default: the input price).
        #[arg(long, value_parser = money)]
        cached_input: Option<Money>,
        #[arg(long, value_parser = money)]
        output: Money,
    },
    /// Remove a model's prices (its calls become free).
    Rm { model: String },
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Group by any of tenant, key, model, day (comma-separated).
    #[arg(long = "by", default_value = "tenant,model,day")]
    pub group_by: String,
    /// First day, YYYY-MM-DD (UTC).
    #[arg(long)]
    pub from: Option<String>,
    /// Last day, YYYY-MM-DD (UTC), inclusive.
    #[arg(long)]
    pub to: Option<String>,
    /// Tenant name or id.
    #[arg(long)]
    pub tenant: Option<String>,
    #[arg(long)]
    pub key: Option<String>,
    #[arg(long)]
    pub model: Option<String>,
    /// Print CSV instead of a table.
    #[arg(long)]
    pub csv: bool,
    #[command(flatten)]
    pub db: DbArgs,
}

/// Prints rows under a header, columns aligned; numeric-looking columns
/// right-aligned.
#[allow(clippy::print_stdout)] // tables are these commands' output
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let numeric: Vec<bool> = (0..header.len())
        .map(|i| {
            !rows.is_empty()
                && rows.iter().all(|r| {
                    r.get(i)
                        .is_some_and(|c| c == "-" || c.parse::<f64>().is_ok())
                })
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if numeric[i] {
                    format!("{c:>w$}", w = widths[i])
                } else {
                    format!("{c:w$}", w = widths[i])
                }
            })
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn find_tenant(db: &dyn Database, id_or_name: &str) -> anyhow::Result<Tenant> {
    db.tenant(id_or_name)?.with_context(|| {
        format!("no tenant named or with id `{id_or_name}`; `kiln tenants list` shows them")
    })
}

fn day_of(ms: Option<i64>) -> String {
    or_dash(ms.map(kiln_store::billing::utc_day))
}

#[allow(clippy::print_stdout)]
pub fn tenants(args: &TenantsArgs) -> anyhow::Result<()> {
    let db = args.db.open()?;
    let currency = db.currency()?;
    match &args.command {
        TenantsCommand::List => {
            let rows: Vec<Vec<String>> = db
                .tenants()?
                .into_iter()
                .map(|t| {
                    vec![
                        t.name,
                        t.id,
                        if t.disabled_at_ms.is_some() {
                            "disabled"
                        } else {
                            "active"
                        }
                        .into(),
                        or_dash(t.balance),
                        t.reserved.to_string(),
                        or_dash(t.limits.monthly_limit),
                        or_dash(t.limits.requests_per_minute),
                        or_dash(t.limits.tokens_per_minute),
                    ]
                })
                .collect();
            let balance = format!("BALANCE ({currency})");
            print_table(
                &[
                    "NAME",
                    "ID",
                    "STATE",
                    &balance,
                    "RESERVED",
                    "MONTHLY LIMIT",
                    "RPM",
                    "TPM",
                ],
                &rows,
            );
        }
        TenantsCommand::Create {
            name,
            monthly_limit,
            rpm,
            tpm,
        } => {
            let t = db.create_tenant(&NewTenant {
                name: name.clone(),
                limits: Limits {
                    monthly_limit: *monthly_limit,
                    requests_per_minute: *rpm,
                    tokens_per_minute: *tpm,
                },
            })?;
            println!("created tenant {} ({})", t.name, t.id);
        }
        TenantsCommand::Update {
            tenant,
            name,
            disable,
            enable,
            monthly_limit,
            rpm,
            tpm,
        } => {
            let t = find_tenant(&*db, tenant)?;
            let update = TenantUpdate {
                name: name.clone(),
                disabled: match (disable, enable) {
                    (true, _) => Some(true),
                    (_, true) => Some(false),
                    _ => None,
                },
                monthly_limit: monthly_limit.map(OrNone::value),
                requests_per_minute: rpm.map(OrNone::value),
                tokens_per_minute: tpm.map(OrNone::value),
            };
            let t = db
                .update_tenant(&t.id, &update)?
                .context("the tenant vanished")?;
            println!(
                "updated tenant {} ({}){}",
                t.name,
                t.id,
                if t.disabled_at_ms.is_some() {
                    ", disabled"
                } else {
                    ""
                }
            );
        }
        TenantsCommand::Credit {
            tenant,
            amount,
            kind,
            note,
            key,
        } => {
            let t = find_tenant(&*db, tenant)?;
            let Some(kind) = CreditKind::parse(kind) else {
                bail!("--kind `{kind}` must be prepaid, grant or adjustment");
            };
            let e = db.add_credit(&NewCredit {
                tenant_id: t.id.clone(),
                key_id: key.clone(),
                kind,
                amount: *amount,
                note: note.clone(),
                created_by: None,
            })?;
            let b = db
                .budget(&t.id, key.as_deref())?
                .context("the account vanished")?;
            println!(
                "{} {} {currency} to {}; balance now {} {currency}",
                e.kind.as_str(),
                e.amount,
                key.as_deref().unwrap_or(&t.name),
                or_dash(b.balance)
            );
        }
        TenantsCommand::Budget { tenant, key } => {
            let t = find_tenant(&*db, tenant)?;
            let b = db.budget(&t.id, key.as_deref())?.with_context(|| {
                format!(
                    "no key `{}` in tenant {}",
                    key.as_deref().unwrap_or(""),
                    t.name
                )
            })?;
            println!("account          {}", key.as_deref().unwrap_or(&t.name));
            println!("balance          {} {currency}", or_dash(b.balance));
            println!("reserved         {} {currency}", b.reserved);
            println!("monthly limit    {}", or_dash(b.monthly_limit));
            println!("spent in {}  {} {currency}", b.month, b.spent_this_month);
        }
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
pub fn keys(args: &KeysArgs) -> anyhow::Result<()> {
    let db = args.db.open()?;
    match &args.command {
        KeysCommand::Create {
            tenant,
            name,
            role,
            models,
            expires_in_days,
            monthly_limit,
            rpm,
            tpm,
            priority,
            groups,
        } => {
            let t = find_tenant(&*db, tenant)?;
            let Some(role) = Role::parse(role) else {
                bail!("--role `{role}` must be member, tenant_admin or platform_admin");
            };
            let expires_at_ms = match expires_in_days {
                None => None,
                Some(d) if (1..=3650).contains(d) => Some(kiln_store::now_ms() + d * 86_400_000),
                Some(d) => bail!("--expires-in-days {d} must be between 1 and 3650"),
            };
            let issued = db.create_key(&NewKey {
                tenant_id: t.id,
                name: name.clone(),
                role,
                models: models.clone(),
                expires_at_ms,
                limits: Limits {
                    monthly_limit: *monthly_limit,
                    requests_per_minute: *rpm,
                    tokens_per_minute: *tpm,
                },
                priority: *priority,
                groups: groups.clone(),
            })?;
            eprintln!(
                "created key {} ({}, tenant {}); its secret is shown only now:",
                issued.key.id,
                issued.key.role.as_str(),
                t.name
            );
            println!("{}", issued.secret);
        }
        KeysCommand::List { tenant } => {
            let tenant_id = match tenant {
                Some(t) => Some(find_tenant(&*db, t)?.id),
                None => None,
            };
            let now = kiln_store::now_ms();
            let rows: Vec<Vec<String>> = db
                .keys(tenant_id.as_deref())?
                .into_iter()
                .map(|k| {
                    let state = k.unusable_because(now).map_or("active", |why| {
                        if why.contains("revoked") {
                            "revoked"
                        } else {
                            "expired"
                        }
                    });
                    vec![
                        k.id,
                        k.name,
                        k.tenant_id,
                        k.role.as_str().into(),
                        format!("{}…", k.prefix),
                        state.into(),
                        day_of(Some(k.created_at_ms)),
                        day_of(k.expires_at_ms),
                        k.models.map_or_else(|| "all".to_string(), |m| m.join(",")),
                    ]
                })
                .collect();
            print_table(
                &[
                    "ID", "NAME", "TENANT", "ROLE", "PREFIX", "STATE", "CREATED", "EXPIRES",
                    "MODELS",
                ],
                &rows,
            );
        }
        KeysCommand::Revoke { id } => {
            let k = db
                .revoke_key(id)?
                .with_context(|| format!("no key `{id}`"))?;
            println!("revoked key {} ({})", k.id, k.name);
        }
        KeysCommand::Rotate { id } => {
            let issued = db.rotate_key(id)?.with_context(|| {
                format!("no active key `{id}` (revoked keys cannot be rotated)")
            })?;
            eprintln!(
                "key {} has a new secret; the old one no longer works. Shown only now:",
                issued.key.id
            );
            println!("{}", issued.secret);
        }
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
pub fn prices(args: &PricesArgs) -> anyhow::Result<()> {
    let db = args.db.open()?;
    let currency = db.currency()?;
    match &args.command {
        PricesCommand::List => {
            let rows: Vec<Vec<String>> = db
                .prices()?
                .into_iter()
                .map(|(m, p)| {
                    vec![
                        m,
                        p.input.to_string(),
                        p.cached_input.to_string(),
                        p.output.to_string(),
                    ]
                })
                .collect();
            let h = |what: &str| format!("{what} ({currency}/1M)");
            print_table(
                &["MODEL", &h("INPUT"), &h("CACHED INPUT"), &h("OUTPUT")],
                &rows,
            );
        }
        PricesCommand::Set {
            model,
            input,
            cached_input,
            output,
        } => {
            db.set_price(
                model,
                &Prices {
                    currency: currency.clone(),
                    input: *input,
                    cached_input: cached_input.unwrap_or(*input),
                    output: *output,
                },
            )?;
            println!("{model}: input {input}, output {output} {currency} per million tokens");
        }
        PricesCommand::Rm { model } => {
            if !db.delete_price(model)? {
                bail!("`{model}` has no price");
            }
            println!("removed the price of {model}");
        }
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
pub fn usage(args: &UsageArgs) -> anyhow::Result<()> {
    let db = args.db.open()?;
    let tenant_id = match &args.tenant {
        Some(t) => Some(find_tenant(&*db, t)?.id),
        None => None,
    };
    let view = UsageParamsView {
        group_by: Some(&args.group_by),
        from: args.from.as_deref(),
        to: args.to.as_deref(),
        tenant_id: tenant_id.as_deref(),
        key_id: args.key.as_deref(),
        model: args.model.as_deref(),
    };
    let q = parse_usage_query(&view).map_err(|e| anyhow::anyhow!(e.message))?;
    let rows = db.usage(&q)?;
    let currency = db.currency()?;
    if args.csv {
        print!("{}", usage_csv(&q.group_by, &rows, &currency));
        return Ok(());
    }
    // Tenant ids are long: show names.
    let names: std::collections::HashMap<String, String> =
        db.tenants()?.into_iter().map(|t| (t.id, t.name)).collect();
    let mut header: Vec<String> = q
        .group_by
        .iter()
        .map(|g| format!("{g:?}").to_uppercase())
        .collect();
    header.extend(
        ["CALLS", "ERRORS", "PROMPT", "CACHED", "COMPLETION"]
            .iter()
            .map(|s| s.to_string()),
    );
    header.push(format!("COST ({currency})"));
    let cells = |r: &kiln_store::UsageRow, label: Option<&str>| -> Vec<String> {
        let mut c: Vec<String> = q
            .group_by
            .iter()
            .enumerate()
            .map(|(i, g)| {
                if let Some(l) = label {
                    return if i == 0 { l.to_string() } else { String::new() };
                }
                let v = match g {
                    kiln_store::GroupBy::Tenant => r
                        .tenant_id
                        .as_ref()
                        .map(|id| names.get(id).cloned().unwrap_or(id.clone())),
                    kiln_store::GroupBy::Key => r.key_id.clone(),
                    kiln_store::GroupBy::Model => r.model.clone(),
                    kiln_store::GroupBy::Day => r.day.clone(),
                };
                v.unwrap_or_else(|| "-".into())
            })
            .collect();
        c.extend([
            r.calls.to_string(),
            r.errors.to_string(),
            r.prompt_tokens.to_string(),
            r.cached_tokens.to_string(),
            r.completion_tokens.to_string(),
            r.cost.to_string(),
        ]);
        c
    };
    let mut table: Vec<Vec<String>> = rows.iter().map(|r| cells(r, None)).collect();
    table.push(cells(&totals(&rows), Some("TOTAL")));
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    print_table(&header, &table);
    Ok(())
}
