{{/*
Helpers of the llmos chart. Names, labels, the image, the addresses the
processes give each other, and the checks values.schema.json cannot express.
*/}}

{{/* Chart name, after nameOverride. */}}
{{- define "llmos.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name every resource name starts with: fullnameOverride, else the release
name when it contains the chart name, else `<release>-<chart>`.
*/}}
{{- define "llmos.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "llmos.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels selecting this release's pods (every component). */}}
{{- define "llmos.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmos.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "llmos.labels" -}}
helm.sh/chart: {{ include "llmos.chart" . }}
{{ include "llmos.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llmos
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The image, `repository:tag` (tag defaults to the chart's appVersion). */}}
{{- define "llmos.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/* Ports: one of each, used by every template. */}}
{{/* Port of the coordinators' public gRPC API (Inference, Admin: API keys). */}}
{{- define "llmos.coordinator.port" -}}50051{{- end }}

{{/*
Port of the coordinators' internal plane (`--internal-listen`): the worker
Registry and Raft between coordinators; coordinator.internalPort.
*/}}
{{- define "llmos.coordinator.internalPort" -}}{{ .Values.coordinator.internalPort | int }}{{- end }}

{{/* Port of the coordinators' OpenAI-compatible HTTP API. */}}
{{- define "llmos.coordinator.httpPort" -}}8000{{- end }}
{{- define "llmos.worker.port" -}}50061{{- end }}
{{- define "llmos.worker.collectivePort" -}}50062{{- end }}

{{/* Port of the workers' Prometheus `/metrics` (`--metrics-listen`): worker.metricsPort. */}}
{{- define "llmos.worker.metricsPort" -}}{{ .Values.worker.metricsPort | int }}{{- end }}

{{/* Coordinator names. */}}
{{- define "llmos.coordinator.fullname" -}}
{{- printf "%s-coordinator" (include "llmos.fullname" .) }}
{{- end }}
{{- define "llmos.coordinator.peersService" -}}
{{- printf "%s-coordinator-peers" (include "llmos.fullname" .) }}
{{- end }}

{{/* Coordinator selector labels. */}}
{{- define "llmos.coordinator.selectorLabels" -}}
{{ include "llmos.selectorLabels" . }}
app.kubernetes.io/component: coordinator
{{- end }}

{{/* The client URL of the coordinators (public API): their client Service's FQDN. */}}
{{- define "llmos.coordinator.url" -}}
{{- printf "http://%s.%s.svc.%s:%s" (include "llmos.coordinator.fullname" .) .Release.Namespace .Values.clusterDomain (include "llmos.coordinator.port" .) }}
{{- end }}

{{/*
Internal-plane URL of one coordinator pod: its stable name through the
headless peers Service, on the internal port.
Call with (dict "ctx" $ "pod" "<pod name or $(POD_NAME)>").
*/}}
{{- define "llmos.coordinator.peerURL" -}}
{{- $ctx := .ctx }}
{{- printf "http://%s.%s.%s.svc.%s:%s" .pod (include "llmos.coordinator.peersService" $ctx) $ctx.Release.Namespace $ctx.Values.clusterDomain (include "llmos.coordinator.internalPort" $ctx) }}
{{- end }}

{{/* Names of the coordinator pods, ordinal order. Returns YAML; use with fromYamlArray. */}}
{{- define "llmos.coordinator.podNames" -}}
{{- $names := list }}
{{- range $i := until (int .Values.coordinator.replicas) }}
{{- $names = append $names (printf "%s-%d" (include "llmos.coordinator.fullname" $) $i) }}
{{- end }}
{{- toYaml $names }}
{{- end }}

{{/*
Founding Raft peers: `1=http://<fullname>-coordinator-0.<peers svc>...:<internalPort>,2=...`,
node id = StatefulSet ordinal + 1 (what `--node-id=0` makes of the pod name).
*/}}
{{- define "llmos.coordinator.peers" -}}
{{- $peers := list }}
{{- range $i, $pod := include "llmos.coordinator.podNames" . | fromYamlArray }}
{{- $peers = append $peers (printf "%d=%s" (add1 $i) (include "llmos.coordinator.peerURL" (dict "ctx" $ "pod" $pod))) }}
{{- end }}
{{- join "," $peers }}
{{- end }}

{{/*
The workers' `--coordinator`: every coordinator's internal-plane URL,
comma-separated (a worker tries them in turn; followers forward to the leader).
*/}}
{{- define "llmos.coordinator.internalURLs" -}}
{{- $urls := list }}
{{- range $pod := include "llmos.coordinator.podNames" . | fromYamlArray }}
{{- $urls = append $urls (include "llmos.coordinator.peerURL" (dict "ctx" $ "pod" $pod)) }}
{{- end }}
{{- join "," $urls }}
{{- end }}

{{/* Worker pool names; call with (dict "ctx" $ "pool" $pool). */}}
{{- define "llmos.worker.fullname" -}}
{{- printf "%s-worker-%s" (include "llmos.fullname" .ctx) .pool.name }}
{{- end }}

{{/* Worker pool selector labels; call with (dict "ctx" $ "pool" $pool). */}}
{{- define "llmos.worker.selectorLabels" -}}
{{ include "llmos.selectorLabels" .ctx }}
app.kubernetes.io/component: worker
llmos.io/pool: {{ .pool.name }}
{{- end }}

{{/* A pool's drain timeout: its own, else worker.drainTimeoutSeconds (0 is kept). */}}
{{- define "llmos.worker.drainTimeout" -}}
{{- if and (hasKey .pool "drainTimeoutSeconds") (not (kindIs "invalid" .pool.drainTimeoutSeconds)) }}
{{- .pool.drainTimeoutSeconds | int }}
{{- else }}
{{- .ctx.Values.worker.drainTimeoutSeconds | int }}
{{- end }}
{{- end }}

{{/*
A pool's autoscaling settings: the global `autoscaling` block overridden by
the pool's own `autoscaling` map. Returns YAML; use with fromYaml.
*/}}
{{- define "llmos.worker.autoscaling" -}}
{{- $g := .ctx.Values.autoscaling }}
{{- $p := .pool.autoscaling | default dict }}
{{- $enabled := $g.enabled }}
{{- if hasKey $p "enabled" }}{{ $enabled = $p.enabled }}{{ end }}
enabled: {{ $enabled }}
minReplicas: {{ $p.minReplicas | default $g.minReplicas | int }}
maxReplicas: {{ $p.maxReplicas | default $g.maxReplicas | int }}
{{- end }}

{{/* Downward-API environment every llmos process gets. */}}
{{- define "llmos.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end }}

{{/* The /tmp emptyDir (the root filesystem is read-only): volume and mount. */}}
{{- define "llmos.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end }}
{{- define "llmos.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* Pod-level fields shared by every pod: pull secrets, account, security. */}}
{{- define "llmos.podCommon" -}}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A gRPC probe on PORT with the timings in PROBE: (dict "port" .. "probe" ..). */}}
{{- define "llmos.grpcProbe" -}}
grpc:
  port: {{ .port }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end }}

{{/* A TCP probe on PORT with the timings in PROBE: (dict "port" .. "probe" ..). */}}
{{- define "llmos.tcpProbe" -}}
tcpSocket:
  port: {{ .port }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end }}

{{/*
A worker's probe: gRPC health on its gRPC port when that port is plaintext
(internalTLS.enabled=false); with internal TLS that port takes only
mutual-TLS connections, which the kubelet's gRPC probe cannot make, so a TCP
connection to the plaintext metrics port (always listening, from the same
process) stands in. Not an HTTP GET of /metrics: that waits for the shard
host, which a model load keeps busy for minutes. Not a TCP connection to
the gRPC port either: each would be logged as a failed TLS handshake.
Call with (dict "ctx" $ "probe" ..).
*/}}
{{- define "llmos.worker.probe" -}}
{{- if .ctx.Values.internalTLS.enabled }}
{{- include "llmos.tcpProbe" (dict "port" (include "llmos.worker.metricsPort" .ctx) "probe" .probe) }}
{{- else }}
{{- include "llmos.grpcProbe" (dict "port" (include "llmos.worker.port" .ctx) "probe" .probe) }}
{{- end }}
{{- end }}

{{/* Checksum of the models list: the Job's annotation, so a change re-runs it visibly. */}}
{{- define "llmos.models.checksum" -}}
{{- toJson .Values.models | sha256sum }}
{{- end }}

{{/* Name of the model the helm test pod generates with ("" when none). */}}
{{- define "llmos.tests.model" -}}
{{- if .Values.tests.model }}
{{- .Values.tests.model }}
{{- else if .Values.models }}
{{- (first .Values.models).name }}
{{- end }}
{{- end }}

{{/* Secret holding the bootstrap admin key: auth.existingSecret, else `<fullname>-auth` (the chart's). */}}
{{- define "llmos.auth.secretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "llmos.fullname" .)) }}
{{- end }}

{{/* Where the coordinators read the admin key (`--admin-key-file`): the Secret's volume and the file in it. */}}
{{- define "llmos.auth.dir" -}}/etc/llmos/auth{{- end }}
{{- define "llmos.auth.file" -}}admin-key{{- end }}

{{/*
LLMOS_API_KEY from the admin key's Secret, for the pods running the CLI
against the coordinators (the models Job, the `helm test` pod); nothing when
auth is off.
*/}}
{{- define "llmos.auth.apiKeyEnv" -}}
{{- if .Values.auth.enabled }}
- name: LLMOS_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "llmos.auth.secretName" . }}
      key: {{ .Values.auth.secretKey | quote }}
{{- end }}
{{- end }}

{{/*
Mutual TLS on the internal plane (internalTLS). Every pod of a role mounts
its certificate, its key and the CA at the same paths, whichever Secret
they come from: /etc/llmos/tls/<role>.crt, <role>.key and ca.crt.
*/}}
{{- define "llmos.tls.dir" -}}/etc/llmos/tls{{- end }}

{{/* The Secret the chart generates when no Secret of the user's is named. */}}
{{- define "llmos.tls.generatedSecretName" -}}
{{- printf "%s-internal-tls" (include "llmos.fullname" .) }}
{{- end }}

{{/* Whether the chart generates the internal TLS Secret ("true" or ""). */}}
{{- define "llmos.tls.generates" -}}
{{- $t := .Values.internalTLS }}
{{- if and $t.enabled (not $t.secretName) (not $t.coordinatorSecret) (not $t.workerSecret) }}true{{ end }}
{{- end }}

{{/*
Where a role's certificate comes from: the Secret and its keys of the
certificate, the key and the CA. Call with (dict "ctx" $ "role"
"coordinator"|"worker"); returns YAML, use with fromYaml.
  - internalTLS.<role>Secret: a cert-manager Secret (tls.crt, tls.key, ca.crt);
  - else internalTLS.secretName, or the generated Secret: <role>.crt,
    <role>.key, ca.crt.
*/}}
{{- define "llmos.tls.source" -}}
{{- $t := .ctx.Values.internalTLS }}
{{- $perRole := get $t (printf "%sSecret" .role) }}
{{- if $perRole }}
secret: {{ $perRole | quote }}
cert: tls.crt
key: tls.key
ca: ca.crt
{{- else }}
secret: {{ $t.secretName | default (include "llmos.tls.generatedSecretName" .ctx) | quote }}
cert: {{ printf "%s.crt" .role | quote }}
key: {{ printf "%s.key" .role | quote }}
ca: ca.crt
{{- end }}
{{- end }}

{{/*
A role's internal-plane flags: the certificate files, or --insecure with
internalTLS.enabled=false. Call with (dict "ctx" $ "role" ...).
*/}}
{{- define "llmos.tls.args" -}}
{{- if .ctx.Values.internalTLS.enabled -}}
{{- $dir := include "llmos.tls.dir" .ctx -}}
- --tls-cert={{ $dir }}/{{ .role }}.crt
- --tls-key={{ $dir }}/{{ .role }}.key
- --tls-ca={{ $dir }}/ca.crt
{{- else -}}
- --insecure
{{- end }}
{{- end }}

{{/*
A role's volume of its certificate (with internalTLS.enabled only). The
whole volume is mounted (no subPath), so the kubelet's updates of the Secret
reach the files, which the processes read again when they change: no
restart, and no checksum annotation on the pods. Call with (dict "ctx" $
"role" ...).
*/}}
{{- define "llmos.tls.volume" -}}
{{- $s := include "llmos.tls.source" . | fromYaml -}}
- name: internal-tls
  secret:
    secretName: {{ $s.secret }}
    defaultMode: 0440
    items:
      - key: {{ $s.cert | quote }}
        path: {{ .role }}.crt
      - key: {{ $s.key | quote }}
        path: {{ .role }}.key
      - key: {{ $s.ca | quote }}
        path: ca.crt
{{- end }}
{{- define "llmos.tls.mount" -}}
- name: internal-tls
  mountPath: {{ include "llmos.tls.dir" . }}
  readOnly: true
{{- end }}

{{/*
Checks values.schema.json cannot express; each failure names the value and
what to do. Included once, by the coordinator StatefulSet.
*/}}
{{- define "llmos.validate" -}}
{{- $fullname := include "llmos.fullname" . }}
{{- if gt (len (include "llmos.coordinator.peersService" .)) 63 }}
{{- fail (printf "the name %q is longer than 63 characters: set fullnameOverride (or a shorter release name)" (include "llmos.coordinator.peersService" .)) }}
{{- end }}
{{- $internalPort := include "llmos.coordinator.internalPort" . }}
{{- if has $internalPort (list (include "llmos.coordinator.port" .) (include "llmos.coordinator.httpPort" .)) }}
{{- fail (printf "coordinator.internalPort (%s) is the coordinators' public gRPC (%s) or HTTP (%s) port: pick another (the internal plane needs a port of its own)" $internalPort (include "llmos.coordinator.port" .) (include "llmos.coordinator.httpPort" .)) }}
{{- end }}
{{- $metricsPort := include "llmos.worker.metricsPort" . }}
{{- if has $metricsPort (list (include "llmos.worker.port" .) (include "llmos.worker.collectivePort" .)) }}
{{- fail (printf "worker.metricsPort (%s) is the workers' gRPC (%s) or collective (%s) port: pick another" $metricsPort (include "llmos.worker.port" .) (include "llmos.worker.collectivePort" .)) }}
{{- end }}
{{- if and .Values.auth.metricsNeedKey (not .Values.auth.enabled) }}
{{- fail "auth.metricsNeedKey needs auth.enabled: with --no-auth there are no keys to ask for" }}
{{- end }}
{{- with .Values.internalTLS }}
{{- if ne (not .coordinatorSecret) (not .workerSecret) }}
{{- fail "internalTLS.coordinatorSecret and internalTLS.workerSecret go together (one cert-manager Secret per role, from the same CA): set both, or neither" }}
{{- end }}
{{- if and .secretName .coordinatorSecret }}
{{- fail "internalTLS.secretName (one Secret with both roles' certificates) and internalTLS.coordinatorSecret/workerSecret (one Secret per role) exclude each other: set one of them" }}
{{- end }}
{{- end }}
{{- $pools := dict }}
{{- range $i, $pool := .Values.workerPools }}
{{- if hasKey $pools $pool.name }}
{{- fail (printf "workerPools[%d]: pool name %q is used twice" $i $pool.name) }}
{{- end }}
{{- $_ := set $pools $pool.name true }}
{{- $sts := include "llmos.worker.fullname" (dict "ctx" $ "pool" $pool) }}
{{- if gt (len $sts) 52 }}
{{- fail (printf "workerPools[%d]: StatefulSet name %q is longer than 52 characters (its pods' revision label must fit in 63): shorten the pool name or set fullnameOverride" $i $sts) }}
{{- end }}
{{- if ne ($pool.device | default "cpu") "cuda" }}
{{- $res := $pool.resources | default dict }}
{{- range $kind := list "requests" "limits" }}
{{- range $k, $v := (get $res $kind | default dict) }}
{{- if contains "gpu" (lower $k) }}
{{- fail (printf "workerPools[%d] (%s): device is cpu but resources.%s asks for %s; GPU resources belong in a pool with device: cuda" $i $pool.name $kind $k) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- $as := include "llmos.worker.autoscaling" (dict "ctx" $ "pool" $pool) | fromYaml }}
{{- if and $as.enabled (gt (int $as.minReplicas) (int $as.maxReplicas)) }}
{{- fail (printf "workerPools[%d] (%s): autoscaling.minReplicas (%d) is above maxReplicas (%d)" $i $pool.name (int $as.minReplicas) (int $as.maxReplicas)) }}
{{- end }}
{{- end }}
{{- $models := dict }}
{{- range $i, $m := .Values.models }}
{{- if hasKey $models $m.name }}
{{- fail (printf "models[%d]: model name %q is listed twice" $i $m.name) }}
{{- end }}
{{- $_ := set $models $m.name true }}
{{- if and $m.pool (not (hasKey $pools $m.pool)) }}
{{- fail (printf "models[%d] (%s): pool %q is not one of workerPools (%s)" $i $m.name $m.pool (keys $pools | sortAlpha | join ", ")) }}
{{- end }}
{{- with $m.autoscale }}
{{- if gt (int .min) (int .max) }}
{{- fail (printf "models[%d] (%s): autoscale.min (%d) is above autoscale.max (%d)" $i $m.name (int .min) (int .max)) }}
{{- end }}
{{- end }}
{{- if and $m.split $m.stages }}
{{- if ne (len $m.split) (int $m.stages) }}
{{- fail (printf "models[%d] (%s): split has %d stages but stages is %d" $i $m.name (len $m.split) (int $m.stages)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
