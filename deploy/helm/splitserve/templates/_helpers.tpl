{{/*
Names, labels, addresses and the worker pod spec shared by the templates.
*/}}

{{- define "splitserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "splitserve.fullname" -}}
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

{{- define "splitserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: call with (dict "root" $ "component" "router"). */}}
{{- define "splitserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "splitserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "splitserve.labels" -}}
{{ include "splitserve.selectorLabels" . }}
helm.sh/chart: {{ include "splitserve.chart" .root }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: splitserve
{{- end }}

{{- define "splitserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Cluster state URL for the router's --redis-url; empty: the router hosts it in memory. */}}
{{- define "splitserve.redisUrl" -}}
{{- if .Values.redis.enabled -}}
redis://{{ include "splitserve.fullname" . }}-redis:{{ .Values.redis.port | int }}/0
{{- else if .Values.redis.externalUrl -}}
{{ .Values.redis.externalUrl }}
{{- end -}}
{{- end }}

{{/* Workers' --cluster: Redis when there is one, else the router's embedded store. */}}
{{- define "splitserve.clusterUrl" -}}
{{- $redis := include "splitserve.redisUrl" . -}}
{{- if $redis -}}
{{ $redis }}
{{- else -}}
grpc://{{ include "splitserve.fullname" . }}-router:{{ .Values.router.service.port | int }}
{{- end -}}
{{- end }}

{{/* host:port of the shared KV rendezvous store (its Service); empty in mode worker. */}}
{{- define "splitserve.kvStoreAddress" -}}
{{- if ne .Values.kvStore.mode "worker" -}}
{{ include "splitserve.fullname" . }}-kv-store:{{ .Values.kvStore.port | int }}
{{- end -}}
{{- end }}

{{/* Engine flags shared by prefill and decode (`splitserve prefill --help`, group "engine"). */}}
{{- define "splitserve.engineArgs" -}}
- --model
- {{ .Values.model | quote }}
- --dtype
- {{ .Values.engine.dtype | quote }}
- --device
- {{ .Values.engine.device | quote }}
- --block-size
- {{ .Values.engine.blockSize | int | quote }}
- --max-num-seqs
- {{ .Values.engine.maxNumSeqs | int | quote }}
- --max-num-batched-tokens
- {{ .Values.engine.maxNumBatchedTokens | int | quote }}
- --attention-backend
- {{ .Values.engine.attentionBackend | quote }}
{{- with .Values.engine.numKvBlocks }}
- --num-kv-blocks
- {{ . | int | quote }}
{{- end }}
{{- with .Values.engine.maxModelLen }}
- --max-model-len
- {{ . | int | quote }}
{{- end }}
{{- with .Values.engine.threads }}
- --threads
- {{ . | int | quote }}
{{- end }}
{{- if not .Values.engine.prefixCaching }}
- --no-prefix-caching
{{- end }}
{{- end }}

{{/* Refuse values that cannot work, before anything is applied. */}}
{{- define "splitserve.validate" -}}
{{- if not (has .Values.kvStore.mode (list "worker" "dedicated" "decode")) }}
{{- fail (printf "kvStore.mode must be worker, dedicated or decode, got %q" .Values.kvStore.mode) }}
{{- end }}
{{- if and .Values.redis.enabled .Values.redis.externalUrl }}
{{- fail "set redis.enabled or redis.externalUrl, not both" }}
{{- end }}
{{- if and (gt (int .Values.router.replicas) 1) (not (include "splitserve.redisUrl" .)) }}
{{- fail "router.replicas > 1 needs shared cluster state: redis.enabled or redis.externalUrl" }}
{{- end }}
{{- range $role := list "prefill" "decode" }}
{{- $cfg := index $.Values $role }}
{{- if le (int $cfg.terminationGracePeriodSeconds) (int $cfg.drainTimeoutSeconds) }}
{{- fail (printf "%s.terminationGracePeriodSeconds must exceed %s.drainTimeoutSeconds" $role $role) }}
{{- end }}
{{- if $cfg.autoscaling.enabled }}
{{- if not (and $.Values.router.pdControl.enabled $.Values.router.httpPort) }}
{{- fail (printf "%s.autoscaling scales on the router's P:D hint: it needs router.pdControl.enabled and router.httpPort" $role) }}
{{- end }}
{{- if lt (int $cfg.autoscaling.maxReplicas) (int $cfg.replicas) }}
{{- fail (printf "%s.autoscaling.maxReplicas must be at least %s.replicas" $role $role) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Mutual TLS (auth.tlsSecret). "splitserve.tlsEnv" takes (dict "root" $ "addr" HOST:PORT): the
folder of the TLS files and the address deploy/healthcheck.py checks. "splitserve.probeAction"
takes (dict "root" $ "port" PORT): a native gRPC probe, or, with TLS (which the kubelet
cannot speak), the health check script over mutual TLS.
*/}}
{{- define "splitserve.tlsEnv" -}}
{{- if .root.Values.auth.tlsSecret }}
- name: SPLITSERVE_TLS_DIR
  value: /etc/splitserve/tls
- name: HEALTHCHECK_ADDR
  value: {{ .addr | quote }}
{{- end }}
{{- end }}

{{- define "splitserve.probeAction" -}}
{{- if .root.Values.auth.tlsSecret }}
exec:
  command: ["python", "/opt/splitserve/healthcheck.py"]
{{- else }}
grpc:
  port: {{ .port | int }}
{{- end }}
{{- end }}

{{- define "splitserve.tlsVolumeMount" -}}
{{- if .Values.auth.tlsSecret }}
- name: tls
  mountPath: /etc/splitserve/tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "splitserve.tlsVolume" -}}
{{- with .Values.auth.tlsSecret }}
- name: tls
  secret:
    secretName: {{ . | quote }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/*
The pod spec of a worker process, `splitserve prefill|decode` in plain-process mode.
Call with (dict "root" $ "role" "prefill" "cfg" .Values.prefill "kvStore" ADDR
"serveKvStore" BOOL). The worker binds and registers POD_IP:port (the downward API gives
the pod IP), so the router and the other workers reach it directly, not via a Service.
*/}}
{{- define "splitserve.workerPodSpec" -}}
{{- $root := .root -}}
{{- $cfg := .cfg -}}
terminationGracePeriodSeconds: {{ $cfg.terminationGracePeriodSeconds | int }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with $cfg.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $cfg.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $cfg.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: {{ .role }}
    image: {{ include "splitserve.image" $root }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    command: ["splitserve"]
    args:
      - --log-level
      - {{ $root.Values.logLevel | quote }}
      - {{ .role }}
      {{- include "splitserve.engineArgs" $root | nindent 6 }}
      - --host
      - $(POD_IP)
      - --port
      - {{ $cfg.port | int | quote }}
      - --cluster
      - {{ include "splitserve.clusterUrl" $root | quote }}
      {{- if .kvStore }}
      - --kv-store
      - {{ .kvStore | quote }}
      {{- end }}
      - --kv-timeout
      - {{ $cfg.kvTimeoutSeconds | quote }}
      - --heartbeat-ttl
      - {{ $cfg.heartbeatTtlSeconds | quote }}
      - --drain-timeout
      - {{ $cfg.drainTimeoutSeconds | quote }}
      {{- if .serveKvStore }}
      - --serve-kv-store
      {{- end }}
      {{- range $cfg.extraArgs }}
      - {{ . | quote }}
      {{- end }}
    env:
      - name: POD_IP
        valueFrom:
          fieldRef:
            fieldPath: status.podIP
      {{- with $root.Values.auth.clusterTokenSecret }}
      - name: SPLITSERVE_CLUSTER_TOKEN
        valueFrom:
          secretKeyRef:
            name: {{ . | quote }}
            key: cluster-token
      {{- end }}
      {{- include "splitserve.tlsEnv" (dict "root" $root "addr" (printf "$(POD_IP):%d" ($cfg.port | int))) | nindent 6 }}
      {{- with $root.Values.network.socketIfname }}
      - name: GLOO_SOCKET_IFNAME
        value: {{ . | quote }}
      - name: NCCL_SOCKET_IFNAME
        value: {{ . | quote }}
      {{- end }}
      {{- with $cfg.env }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    ports:
      - name: grpc
        containerPort: {{ $cfg.port | int }}
        protocol: TCP
      {{- if .serveKvStore }}
      - name: kv-store
        containerPort: {{ $root.Values.kvStore.port | int }}
        protocol: TCP
      {{- end }}
    startupProbe:
      {{- include "splitserve.probeAction" (dict "root" $root "port" $cfg.port) | nindent 6 }}
      periodSeconds: {{ $root.Values.probes.startup.periodSeconds | int }}
      failureThreshold: {{ $root.Values.probes.startup.failureThreshold | int }}
    readinessProbe:
      {{- include "splitserve.probeAction" (dict "root" $root "port" $cfg.port) | nindent 6 }}
      periodSeconds: {{ $root.Values.probes.readiness.periodSeconds | int }}
      timeoutSeconds: {{ $root.Values.probes.readiness.timeoutSeconds | int }}
      failureThreshold: {{ $root.Values.probes.readiness.failureThreshold | int }}
    livenessProbe:
      {{- include "splitserve.probeAction" (dict "root" $root "port" $cfg.port) | nindent 6 }}
      periodSeconds: {{ $root.Values.probes.liveness.periodSeconds | int }}
      timeoutSeconds: {{ $root.Values.probes.liveness.timeoutSeconds | int }}
      failureThreshold: {{ $root.Values.probes.liveness.failureThreshold | int }}
    resources:
      {{- toYaml $cfg.resources | nindent 6 }}
    securityContext:
      {{- toYaml $root.Values.securityContext | nindent 6 }}
    volumeMounts:
      - name: dshm
        mountPath: /dev/shm
      {{- include "splitserve.tlsVolumeMount" $root | nindent 6 }}
      {{- with $root.Values.extraVolumeMounts }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
volumes:
  - name: dshm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $root.Values.shm.sizeLimit }}
  {{- include "splitserve.tlsVolume" $root | nindent 2 }}
  {{- with $root.Values.extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
