{{/*
Render-time checks that values.schema.json cannot express with a clear message.
Each one fails the render (helm template / install / upgrade / lint) and names
the value to use instead. templates/validate.yaml runs them on every render.
*/}}

{{- define "pgmeter.validate" -}}
{{- $v := .Values -}}
{{- /* API authentication is on unless switched off explicitly (see pgmeter.authTokensSecret). */ -}}
{{- if and (not $v.auth.enabled) $v.auth.tokensSecret.name -}}
{{- fail (printf "auth: auth.enabled=false contradicts auth.tokensSecret.name=%q; unset one of them" $v.auth.tokensSecret.name) -}}
{{- end -}}
{{- /* NATS credentials need their Secret. */ -}}
{{- $nc := $v.nats.credentials -}}
{{- if and $nc.type (not $nc.secretName) -}}
{{- fail (printf "nats.credentials.type=%s needs nats.credentials.secretName (a Secret in the release namespace)" $nc.type) -}}
{{- end -}}
{{- /* Secrets never sit in plain values. */ -}}
{{- include "pgmeter.refuseSecretKeys" (dict "path" "config" "value" $v.config) -}}
{{- include "pgmeter.refuseSecretKeys" (dict "path" "meters" "value" $v.meters) -}}
{{- include "pgmeter.refuseSecretKeys" (dict "path" "lago" "value" (omit $v.lago "apiKeySecret")) -}}
{{- include "pgmeter.refuseCredentialURLs" (dict "path" "" "value" $v) -}}
{{- include "pgmeter.refuseSecretEnv" (dict "path" "extraEnv" "value" $v.extraEnv) -}}
{{- range $role := list "api" "sink" "refresher" "lagoSync" -}}
{{- include "pgmeter.refuseSecretEnv" (dict "path" (printf "%s.extraEnv" $role) "value" (index $v $role).extraEnv) -}}
{{- end -}}
{{- end -}}

{{/*
A key name that carries a secret, in any spelling: compared lower-cased with
"_" and "-" removed, so authTokens, auth_tokens, AUTH-TOKENS, apiKey, api_key,
Password, nats.token... all match.
*/}}
{{- define "pgmeter.secretKeyPattern" -}}password|passwd|token|apikey|secret|credential|privatekey|nkey{{- end -}}

{{/*
Where a refused key or URL should come from instead; call with the path,
lower-cased with "_" and "-" removed.
*/}}
{{- define "pgmeter.secretHint" -}}
{{- if regexMatch "postgres\\.queryurl" . -}}
postgres.pooler.enabled (the chart composes the pooler URL from the CNPG app Secret)
{{- else if regexMatch "postgres\\.readurl" . -}}
postgres.readReplicas (the chart composes the -ro URL from the CNPG app Secret)
{{- else if regexMatch "postgres" . -}}
postgres.dsnSecret.name/key (or the CNPG app Secret, the default)
{{- else if regexMatch "authtoken|^config\\.auth" . -}}
auth.tokensSecret.name/key
{{- else if regexMatch "nats" . -}}
nats.credentials (type userPassword, token or credsFile, from a Secret)
{{- else if regexMatch "lago|apikey" . -}}
lago.apiKeySecret.name/key
{{- else if regexMatch "valkey|redis" . -}}
valkey.passwordSecret.name/key
{{- else -}}
a Secret: reference it with extraEnv valueFrom.secretKeyRef (PGMETER_<SECTION>_<FIELD>), or materialize it with externalSecrets
{{- end -}}
{{- end -}}

{{/*
Fail on a secret-bearing key anywhere under .value (config, meters, lago: the
maps rendered into the pgmeter.yaml ConfigMap). postgres url/queryUrl/dsn keys
are refused too: a DSN carries the database password. Keys of data maps
(groupBy: property names, subjects: CloudEvent subjects) are event data, not
settings, so only their values are looked at.
Call with (dict "path" "config" "value" .Values.config).
*/}}
{{- define "pgmeter.refuseSecretKeys" -}}
{{- $path := .path -}}
{{- if kindIs "map" .value -}}
{{- $dataMap := regexMatch "\\.(groupby|subjects)$" (lower $path | replace "_" "" | replace "-" "") -}}
{{- range $key, $value := .value -}}
{{- $here := printf "%s.%s" $path $key -}}
{{- $norm := lower $here | replace "_" "" | replace "-" "" -}}
{{- $leaf := lower $key | replace "_" "" | replace "-" "" -}}
{{- if not $dataMap -}}
{{- if regexMatch (include "pgmeter.secretKeyPattern" $) $leaf -}}
{{- fail (printf "%s: secret-bearing key in plain values (it would be rendered into a ConfigMap); put the secret in a Secret and use %s" $here (include "pgmeter.secretHint" $norm)) -}}
{{- end -}}
{{- if and (regexMatch "^config\\.postgres\\.[^.]+$" $norm) (has $leaf (list "url" "queryurl" "readurl" "dsn" "uri")) -}}
{{- fail (printf "%s: a database URL carries its credentials, so it never goes in plain values; use %s" $here (include "pgmeter.secretHint" $norm)) -}}
{{- end -}}
{{- end -}}
{{- include "pgmeter.refuseSecretKeys" (dict "path" $here "value" $value) -}}
{{- end -}}
{{- else if kindIs "slice" .value -}}
{{- range $i, $item := .value -}}
{{- include "pgmeter.refuseSecretKeys" (dict "path" (printf "%s[%d]" $path $i) "value" $item) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Fail on any string anywhere in the values that is a URL with credentials
(scheme://user:password@host or scheme://token@host).
*/}}
{{- define "pgmeter.refuseCredentialURLs" -}}
{{- $path := .path -}}
{{- if kindIs "map" .value -}}
{{- range $key, $value := .value -}}
{{- include "pgmeter.refuseCredentialURLs" (dict "path" (ternary $key (printf "%s.%s" $path $key) (eq $path "")) "value" $value) -}}
{{- end -}}
{{- else if kindIs "slice" .value -}}
{{- range $i, $item := .value -}}
{{- include "pgmeter.refuseCredentialURLs" (dict "path" (printf "%s[%d]" $path $i) "value" $item) -}}
{{- end -}}
{{- else if and (kindIs "string" .value) (regexMatch "[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\\s]*@" .value) -}}
{{- fail (printf "%s: a URL with credentials (user:password@ or token@) in plain values; remove them from the URL and use %s" $path (include "pgmeter.secretHint" (lower $path | replace "_" "" | replace "-" ""))) -}}
{{- end -}}
{{- end -}}

{{/*
Fail on an extraEnv entry with a plain `value` whose name carries a secret
(PGMETER_AUTH_TOKENS, PGMETER_NATS_PASSWORD...): it must use valueFrom.secretKeyRef.
*/}}
{{- define "pgmeter.refuseSecretEnv" -}}
{{- $path := .path -}}
{{- range $i, $env := .value -}}
{{- if and (hasKey $env "value") (regexMatch (include "pgmeter.secretKeyPattern" $) (lower $env.name | replace "_" "" | replace "-" "")) -}}
{{- fail (printf "%s[%d] (%s): a secret in a plain value; use valueFrom.secretKeyRef (or %s)" $path $i $env.name (include "pgmeter.secretHint" (lower $env.name | replace "_" "" | replace "-" ""))) -}}
{{- end -}}
{{- end -}}
{{- end -}}
