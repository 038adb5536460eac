// Every call of OpenMeter's JavaScript SDK (@openmeter/sdk) that reaches an endpoint
// pgmeter serves, against the server at argv[2]. Prints one JSON object:
// {call name: {ok: true, value} | {ok: false, status, error}}; tests/test_sdk_js.py
// checks each value. Times are fixed relative to argv[3] (an RFC 3339 instant).
import { OpenMeter } from '@openmeter/sdk'

const [baseUrl, nowText] = process.argv.slice(2)
const om = new OpenMeter({ baseUrl })
const now = new Date(nowText)
const day0 = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate() - 2))
const hours = (h) => new Date(day0.getTime() + h * 3600 * 1000)
const results = {}

async function call(name, fn) {
  try {
    results[name] = { ok: true, value: await fn() }
  } catch (error) {
    results[name] = { ok: false, status: error.status ?? null, error: String(error.message ?? error) }
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
async function waitForEvents(count) {
  for (let i = 0; i < 600; i++) {
    const listed = await om.events.list({ from: day0, limit: 100 })
    if (listed.length >= count) return
    await sleep(50)
  }
  throw new Error(`the sink did not store ${count} events`)
}

await call('meters.create', () => om.meters.create({
  slug: 'tokens', name: 'Tokens', aggregation: 'SUM', eventType: 'call', valueProperty: '$.tokens',
  groupBy: { model: '$.model', region: '$.region' },
}))
await call('events.ingest (one)', () => om.events.ingest({
  id: 'e1', source: 'js', type: 'call', subject: 'alice', time: hours(1),
  data: { tokens: 10, model: 'gpt-4o', region: 'eu' },
}))
await call('events.ingest (batch)', () => om.events.ingest([
  { id: 'e2', source: 'js', type: 'call', subject: 'alice', time: hours(5), data: { tokens: 5, model: 'GPT-4o-mini', region: 'us' } },
  { id: 'e3', source: 'js', type: 'call', subject: 'bob', time: hours(26), data: { tokens: 7, model: 'claude', region: 'eu' } },
  // No id, source or time: the SDK fills them in.
  { type: 'call', subject: 'bob', data: { tokens: 1, model: 'gpt-4o', region: 'ap' } },
]))
await waitForEvents(4)

await call('events.list', async () => (await om.events.list({
  clientId: 'js', from: day0, to: hours(30), subject: 'alice', id: 'e', limit: 10,
  ingestedAtFrom: new Date(now.getTime() - 3600 * 1000), ingestedAtTo: new Date(now.getTime() + 3600 * 1000),
})).map((item) => ({ id: item.event.id, data: item.event.data, stored: item.storedAt instanceof Date })))
await call('events.list customerId', () => om.events.list({ customerId: ['01ARZ3NDEKTSV4RRFFQ69G5FAV'] }))

await call('meters.get', async () => {
  const meter = await om.meters.get('tokens')
  const byId = await om.meters.get(meter.id)
  return { slug: byId.slug, name: meter.name, aggregation: meter.aggregation, groupBy: meter.groupBy }
})
await call('meters.list', async () => (await om.meters.list()).map((m) => m.slug))
await call('meters.update', async () => {
  await om.meters.create({ slug: 'edited', aggregation: 'COUNT', eventType: 'call' })
  const m = await om.meters.update('edited', { name: 'Edited', description: 'd', groupBy: { region: '$.region' }, metadata: { team: 'a' } })
  return { name: m.name, description: m.description, groupBy: m.groupBy, metadata: m.metadata }
})
await call('meters.delete', async () => {
  await om.meters.create({ slug: 'doomed', aggregation: 'COUNT', eventType: 'call' })
  await om.meters.delete('doomed')
  return (await om.meters.list()).map((m) => m.slug).includes('doomed')
})

const rows = (result) => result.data.map((r) => [r.windowStart?.toISOString(), r.subject ?? null, r.groupBy, r.value])
await call('meters.query', async () => rows(await om.meters.query('tokens', {
  clientId: 'js', from: day0, to: hours(48), windowSize: 'DAY', windowTimeZone: 'UTC',
  subject: ['alice', 'bob'], groupBy: ['model'],
})))
await call('meters.query filterGroupBy', async () => rows(await om.meters.query('tokens', {
  filterGroupBy: { model: 'gpt-4o' }, groupBy: ['region'],
})))
// An object here throws inside the SDK (openapi-fetch cannot serialize nested objects);
// the JSON string OpenMeter's document asks for works.
await call('meters.query advancedMeterGroupByFilters', async () => rows(await om.meters.query('tokens', {
  advancedMeterGroupByFilters: JSON.stringify({ model: { $ilike: 'gpt%' }, region: { $or: [{ $eq: 'eu' }, { $eq: 'us' }] } }),
  groupBy: ['model'],
})))
await call('meters.query filterCustomerId', () => om.meters.query('tokens', { filterCustomerId: ['01ARZ3NDEKTSV4RRFFQ69G5FAV'] }))
await call('meters.queryPost', async () => rows(await om.meters.queryPost('tokens', {
  clientId: 'js', from: day0, to: hours(48), windowSize: 'DAY', windowTimeZone: '', subject: ['alice', 'bob'],
  groupBy: ['model'], filterGroupBy: { model: ['gpt-4o', 'claude'] },
})))
await call('meters.queryPost advancedMeterGroupByFilters', async () => rows(await om.meters.queryPost('tokens', {
  groupBy: ['region'], advancedMeterGroupByFilters: { region: { $and: [{ $gte: 'ap' }, { $lt: 'us' }] } },
})))
await call('meters.listGroupByValues', () => om.meters.listGroupByValues('tokens', 'model', { from: day0, to: now }))

// Usage limits: customer -> feature -> entitlement -> grant -> ingest -> value, the
// customer's usage coming from two subjects (its key and a subject key).
await om.meters.create({ slug: 'js_calls', aggregation: 'COUNT', eventType: 'js.call' })
let customer = null
await call('customers.create', async () => {
  customer = await om.customers.create({ name: 'TPP JS', key: 'tpp-js', usageAttribution: { subjectKeys: ['tpp-js-app'] } })
  return { key: customer.key, subjectKeys: customer.usageAttribution.subjectKeys, id: typeof customer.id }
})
await call('features.create', async () => {
  const feature = await om.features.create({ key: 'js_calls', name: 'JS calls', meterSlug: 'js_calls' })
  return { key: feature.key, meterSlug: feature.meterSlug }
})
await call('customers.entitlements.create', async () => {
  const ent = await om.customers.entitlements.create(customer.id, {
    type: 'metered', featureKey: 'js_calls', usagePeriod: { interval: 'MONTH' }, isSoftLimit: false,
  })
  return { type: ent.type, customerId: ent.customerId === customer.id, featureKey: ent.featureKey }
})
// The wall clock once the entitlement exists, not argv's instant (taken when pytest
// collected, maybe minutes ago): its usage period starts at its creation, and the
// grant may not start before that.
const wall = new Date()
const minute = new Date(Math.floor(wall.getTime() / 60000) * 60000)
let grantId = null
await call('customers.entitlements.createGrant', async () => {
  const grant = await om.customers.entitlements.createGrant('tpp-js', 'js_calls', { amount: 3, effectiveAt: minute })
  grantId = grant.id
  return { amount: grant.amount }
})
await call('events.ingest (customer)', () => om.events.ingest([
  { id: 'c1', source: 'js', type: 'js.call', subject: 'tpp-js', time: wall },
  { id: 'c2', source: 'js', type: 'js.call', subject: 'tpp-js-app', time: wall },
]))
const later = new Date(minute.getTime() + 60000)
await call('customers.entitlements.value', async () => {
  for (let i = 0; i < 600; i++) {  // until the sink has stored both events: an exact answer, not a timing one
    const value = await om.customers.entitlements.value(customer.id, 'js_calls', { query: { time: later } })
    if (value.usage >= 2) return { ...value, grantBalances: value.grantBalances?.[grantId] }
    await sleep(50)
  }
  throw new Error('the sink did not store the customer events')
})
await call('customers.entitlementsV1.value', async () => {
  const value = await om.customers.entitlementsV1.value('tpp-js', 'js_calls')
  return { hasAccess: value.hasAccess, balance: value.balance, usage: value.usage }
})
await call('meters.query filterCustomerId (known)', async () => (await om.meters.query('js_calls', {
  filterCustomerId: [customer.id], groupBy: ['customer_id', 'subject'],
})).data.map((r) => [r.customerId === customer.id, r.subject, r.value]))

process.stdout.write(JSON.stringify(results))
