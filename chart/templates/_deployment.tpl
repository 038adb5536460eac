{{/*
One Deployment per pgmeter role. Every role is the same image running
`pgmeter --config /etc/pgmeter/pgmeter.yaml <role>` and serving /healthz,
/readyz and /metrics on the `http` port.

Call with (dict "root" $ "role" "sink" "values" .Values.sink "replicas" 2),
where "replicas" is omitted when an HPA owns the count.
*/}}
{{- define "pgmeter.deployment" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $role := .role -}}
{{- $rv := .values -}}
{{- $component := dict "root" $root "component" $role -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "pgmeter.componentName" (dict "root" $root "suffix" $role) }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "pgmeter.labels" $component | nindent 4 }}
spec:
  {{- if hasKey . "replicas" }}
  replicas: {{ .replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 1
      maxUnavailable: 0
  selector:
    matchLabels:
      {{- include "pgmeter.selectorLabels" $component | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "pgmeter.labels" $component | nindent 8 }}
        # Selected by the headless metrics Service (Jobs and test pods lack it).
        pgmeter.openova.io/scrape: "true"
        {{- with $v.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        # Roll the pods when pgmeter.yaml changes.
        checksum/config: {{ include "pgmeter.configFile" $root | sha256sum }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "pgmeter.serviceAccountName" $root }}
      # pgmeter never talks to the Kubernetes API.
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: {{ $rv.terminationGracePeriodSeconds }}
      securityContext:
        {{- toYaml $v.podSecurityContext | nindent 8 }}
      {{- with (include "pgmeter.podScheduling" $root) }}
      {{- . | nindent 6 }}
      {{- end }}
      {{- with $v.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $role }}
          image: {{ include "pgmeter.image" $root | quote }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          args:
            - --config
            - /etc/pgmeter/pgmeter.yaml
            - {{ $role }}
            {{- range $rv.extraArgs }}
            - {{ . | quote }}
            {{- end }}
          ports:
            - name: http
              containerPort: {{ $v.port }}
              protocol: TCP
          env:
            {{- include "pgmeter.env" (dict "root" $root "role" $role "extraEnv" $rv.extraEnv) | nindent 12 }}
          startupProbe:
            httpGet: {path: /healthz, port: http}
            {{- toYaml $v.probes.startup | nindent 12 }}
          livenessProbe:
            httpGet: {path: /healthz, port: http}
            {{- toYaml $v.probes.liveness | nindent 12 }}
          readinessProbe:
            httpGet: {path: /readyz, port: http}
            {{- toYaml $v.probes.readiness | nindent 12 }}
          resources:
            {{- toYaml $rv.resources | nindent 12 }}
          securityContext:
            {{- toYaml $v.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - name: config
              mountPath: /etc/pgmeter
              readOnly: true
            # The root filesystem is read-only; Python and the app write only here.
            - name: tmp
              mountPath: /tmp
            {{- if eq $v.nats.credentials.type "credsFile" }}
            - name: nats-creds
              mountPath: {{ include "pgmeter.natsCredsDir" $root }}
              readOnly: true
            {{- end }}
      volumes:
        - name: config
          configMap:
            name: {{ include "pgmeter.componentName" (dict "root" $root "suffix" "config") }}
        - name: tmp
          emptyDir:
            sizeLimit: 256Mi
        {{- if eq $v.nats.credentials.type "credsFile" }}
        # Only the .creds key, owner-readable (the pod's fsGroup owns it).
        - name: nats-creds
          secret:
            secretName: {{ $v.nats.credentials.secretName }}
            defaultMode: 0440
            items:
              - key: {{ $v.nats.credentials.credsKey }}
                path: nats.creds
        {{- end }}
{{- end -}}
