{{/*
Names, labels and the small decisions every template shares.
*/}}

{{- define "pgmeter.name" -}}
{{- default "pgmeter" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name: the release name when it already contains "pgmeter" (release
"pgmeter" -> "pgmeter"), else "<release>-pgmeter". Kept to 45 characters so
suffixed names ("-lago-sync", "-pg-pooler") and CNPG's own derived names
("<cluster>-rw", pod "<cluster>-3") stay within Kubernetes limits.
*/}}
{{- define "pgmeter.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "pgmeter.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<suffix>"; call with (dict "root" $ "suffix" "api"). */}}
{{- define "pgmeter.componentName" -}}
{{- printf "%s-%s" (include "pgmeter.fullname" .root) .suffix | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pgmeter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels; call with (dict "root" $ "component" "api"). Immutable once deployed. */}}
{{- define "pgmeter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pgmeter.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{/* Labels for every resource; call with (dict "root" $ "component" "api"). */}}
{{- define "pgmeter.labels" -}}
helm.sh/chart: {{ include "pgmeter.chart" .root }}
{{ include "pgmeter.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: pgmeter
catalyst.openova.io/blueprint: bp-pgmeter
catalyst.openova.io/component: pgmeter
catalyst.openova.io/backend: {{ .root.Values.catalystBlueprint.backend.kind }}
catalyst.openova.io/event-bus: {{ .root.Values.catalystBlueprint.eventBus.kind }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "pgmeter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pgmeter.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag (tag defaults to appVersion) or repository@digest. */}}
{{- define "pgmeter.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
Capabilities gate: "true" when the cluster serves the API version, or when it
is listed in capabilities.assumeAPIVersions (offline renders cannot see the
cluster). Call with (dict "root" $ "api" "postgresql.cnpg.io/v1").
*/}}
{{- define "pgmeter.hasAPI" -}}
{{- if or (.root.Capabilities.APIVersions.Has .api) (has .api .root.Values.capabilities.assumeAPIVersions) -}}
true
{{- end -}}
{{- end -}}

{{/* ---------- PostgreSQL ---------- */}}

{{- define "pgmeter.clusterName" -}}
{{- default (include "pgmeter.componentName" (dict "root" . "suffix" "pg")) .Values.postgres.clusterName -}}
{{- end -}}

{{- define "pgmeter.poolerName" -}}
{{- include "pgmeter.componentName" (dict "root" . "suffix" "pg-pooler") -}}
{{- end -}}

{{/* "true" when this release renders the CNPG Cluster. */}}
{{- define "pgmeter.clusterRendered" -}}
{{- if and .Values.postgres.cluster.enabled (include "pgmeter.hasAPI" (dict "root" . "api" "postgresql.cnpg.io/v1")) -}}
true
{{- end -}}
{{- end -}}

{{/*
"true" when this release renders the Pooler. The pooler reuses the CNPG app
Secret's credentials, so it cannot combine with an explicit DSN Secret.
*/}}
{{- define "pgmeter.poolerRendered" -}}
{{- if and .Values.postgres.pooler.enabled (include "pgmeter.hasAPI" (dict "root" . "api" "postgresql.cnpg.io/v1")) -}}
{{- if .Values.postgres.dsnSecret.name -}}
{{- fail "postgres.pooler.enabled needs the CNPG app Secret; unset postgres.dsnSecret.name (or run your own pooler)" -}}
{{- end -}}
true
{{- end -}}
{{- end -}}

{{/*
"true" when the api reads meter queries, value lists and the event listing from
the CNPG `-ro` Service (postgres.readReplicas): the URL is composed from the app
Secret's parts, so it cannot combine with an explicit DSN Secret either.
*/}}
{{- define "pgmeter.readReplicasRendered" -}}
{{- if and .Values.postgres.readReplicas (include "pgmeter.hasAPI" (dict "root" . "api" "postgresql.cnpg.io/v1")) -}}
{{- if .Values.postgres.dsnSecret.name -}}
{{- fail "postgres.readReplicas needs the CNPG app Secret; unset postgres.dsnSecret.name" -}}
{{- end -}}
true
{{- end -}}
{{- end -}}

{{/* Secret + key holding the direct DSN. */}}
{{- define "pgmeter.dsnSecretName" -}}
{{- if .Values.postgres.dsnSecret.name -}}
{{- .Values.postgres.dsnSecret.name -}}
{{- else -}}
{{- printf "%s-app" (include "pgmeter.clusterName" .) -}}
{{- end -}}
{{- end -}}

{{- define "pgmeter.dsnSecretKey" -}}
{{- if .Values.postgres.dsnSecret.name -}}
{{- .Values.postgres.dsnSecret.key -}}
{{- else -}}
uri
{{- end -}}
{{- end -}}

{{/*
Migration hook phase. Normally pre-install,pre-upgrade (schema before code).
If this release itself creates what the Job needs to connect (the CNPG Cluster
and its app Secret, or the DSN Secret via an ExternalSecret), those do not
exist yet during pre-install, so the first install migrates post-install.
*/}}
{{- define "pgmeter.migrationHook" -}}
{{- $createsPrereq := include "pgmeter.clusterRendered" . -}}
{{- if .Values.externalSecrets.enabled -}}
{{- $dsn := include "pgmeter.dsnSecretName" . -}}
{{- range .Values.externalSecrets.items -}}
{{- if eq .name $dsn -}}{{- $createsPrereq = "true" -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- if $createsPrereq -}}post-install,pre-upgrade{{- else -}}pre-install,pre-upgrade{{- end -}}
{{- end -}}

{{/* ---------- Pod pieces ---------- */}}

{{/*
Environment for one role; call with (dict "root" $ "role" "api").
Every role gets the direct DSN. Only the api gets the pooler (query) URL,
composed from the CNPG app Secret's parts with $(VAR) expansion: CNPG's
`uri` key always points at <cluster>-rw. CNPG-generated passwords are
alphanumeric, so they need no URL escaping.
*/}}
{{- define "pgmeter.env" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
- name: PGMETER_ADDRESS
  value: {{ printf "0.0.0.0:%v" $v.port | quote }}
- name: PGMETER_LOG_LEVEL
  value: {{ $v.logLevel | quote }}
- name: PGMETER_POSTGRES_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "pgmeter.dsnSecretName" $root }}
      key: {{ include "pgmeter.dsnSecretKey" $root }}
{{- if or (and (eq .role "api") (include "pgmeter.poolerRendered" $root)) (and (eq .role "api") (include "pgmeter.readReplicasRendered" $root)) }}
{{- $app := printf "%s-app" (include "pgmeter.clusterName" $root) }}
- name: CNPG_APP_USER
  valueFrom:
    secretKeyRef: {name: {{ $app }}, key: username}
- name: CNPG_APP_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ $app }}, key: password}
- name: CNPG_APP_DBNAME
  valueFrom:
    secretKeyRef: {name: {{ $app }}, key: dbname}
{{- if and (eq .role "api") (include "pgmeter.poolerRendered" $root) }}
- name: PGMETER_POSTGRES_QUERY_URL
  value: {{ printf "postgresql://$(CNPG_APP_USER):$(CNPG_APP_PASSWORD)@%s.%s.svc:5432/$(CNPG_APP_DBNAME)" (include "pgmeter.poolerName" $root) $root.Release.Namespace | quote }}
{{- end }}
{{- if include "pgmeter.readReplicasRendered" $root }}
- name: PGMETER_POSTGRES_READ_URL
  value: {{ printf "postgresql://$(CNPG_APP_USER):$(CNPG_APP_PASSWORD)@%s-ro.%s.svc:5432/$(CNPG_APP_DBNAME)" (include "pgmeter.clusterName" $root) $root.Release.Namespace | quote }}
{{- end }}
{{- end }}
- name: PGMETER_NATS_URL
  value: {{ $v.nats.url | quote }}
{{- /* Migrations never connect to NATS, so they need no credentials. */}}
{{- if ne .role "migrate" }}
{{- $nc := $v.nats.credentials }}
{{- if eq $nc.type "userPassword" }}
- name: PGMETER_NATS_USER
  valueFrom:
    secretKeyRef: {name: {{ $nc.secretName }}, key: {{ $nc.userKey }}}
- name: PGMETER_NATS_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ $nc.secretName }}, key: {{ $nc.passwordKey }}}
{{- else if eq $nc.type "token" }}
- name: PGMETER_NATS_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ $nc.secretName }}, key: {{ $nc.tokenKey }}}
{{- else if eq $nc.type "credsFile" }}
- name: PGMETER_NATS_CREDS_FILE
  value: {{ include "pgmeter.natsCredsPath" $root }}
{{- end }}
{{- end }}
{{- /* Migrations never use Valkey, and a hook must not wait on a Secret the release creates later. */}}
{{- if and $v.valkey.url (ne .role "migrate") }}
- name: PGMETER_VALKEY_URL
  value: {{ $v.valkey.url | quote }}
{{- if $v.valkey.cluster }}
- name: PGMETER_VALKEY_CLUSTER
  value: "true"
{{- end }}
{{- if $v.valkey.passwordSecret.name }}
- name: PGMETER_VALKEY_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $v.valkey.passwordSecret.name }}
      key: {{ $v.valkey.passwordSecret.key }}
{{- end }}
{{- end }}
{{- if and (eq .role "api") $v.auth.enabled }}
# Not optional: without its tokens the api does not start (auth is on by default).
- name: PGMETER_AUTH_TOKENS
  valueFrom:
    secretKeyRef:
      name: {{ include "pgmeter.authTokensSecret" $root }}
      key: {{ $v.auth.tokensSecret.key }}
{{- end }}
{{- if and $v.lago.enabled (ne .role "lago-sync") }}
# Only lago-sync talks to Lago and holds its API key; pgmeter refuses
# lago.enabled without a key, so the other roles switch the section off.
- name: PGMETER_LAGO_ENABLED
  value: "false"
{{- end }}
{{- if eq .role "lago-sync" }}
- name: PGMETER_LAGO_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ default (include "pgmeter.componentName" (dict "root" $root "suffix" "lago")) $v.lago.apiKeySecret.name }}
      key: {{ $v.lago.apiKeySecret.key }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with .extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The Secret of api tokens: auth.tokensSecret.name, or "<fullname>-auth". Auth is
on by default, so an install that names no Secret still requires one: the api
pods wait (CreateContainerConfigError naming the Secret) until it exists, and
NOTES say how to create it. Only auth.enabled=false runs the api without tokens.
*/}}
{{- define "pgmeter.authTokensSecret" -}}
{{- default (include "pgmeter.componentName" (dict "root" . "suffix" "auth")) .Values.auth.tokensSecret.name -}}
{{- end -}}

{{/* Where the NATS .creds file is mounted (nats.credentials.type=credsFile). */}}
{{- define "pgmeter.natsCredsDir" -}}/etc/pgmeter-nats{{- end -}}
{{- define "pgmeter.natsCredsPath" -}}{{ include "pgmeter.natsCredsDir" . }}/nats.creds{{- end -}}

{{/* pgmeter.yaml: meters, lago (minus the secret ref) and `config` merged on top. */}}
{{- define "pgmeter.configFile" -}}
{{- $lago := omit .Values.lago "apiKeySecret" -}}
{{- $base := dict "namespace" .Values.namespace "meters" .Values.meters "lago" $lago "nats" (dict "replicas" .Values.nats.streamReplicas) -}}
{{- $file := mustMergeOverwrite (deepCopy $base) (deepCopy .Values.config) -}}
{{- toYaml $file -}}
{{- end -}}

{{/* Pod-level scheduling settings shared by every workload. */}}
{{- define "pgmeter.podScheduling" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- /* The collector's OTLP/gRPC ports (pipelines with source.grpcListen), as a JSON list:
the container, its Service and its NetworkPolicy open the same ones. */ -}}
{{- define "pgmeter.collectorGrpcPorts" -}}
{{- $ports := list }}
{{- range .Values.collector.pipelines }}
{{- with (.source).grpcListen }}
{{- $ports = append $ports (splitList ":" (toString .) | last | int) }}
{{- end }}
{{- end }}
{{- toJson ($ports | uniq) }}
{{- end }}
