{{/*
Names. fullname stays short: KubeRay appends suffixes to the RayJob's RayCluster and
its Services (a RayJob name may have at most 47 characters).
*/}}
{{- define "shuffle-r1.name" -}}
{{- .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "shuffle-r1.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "shuffle-r1.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shuffle-r1.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* labels of an object or pod: (dict "root" $ "component" "head") */}}
{{- define "shuffle-r1.labels" -}}
{{ include "shuffle-r1.selectorLabels" .root }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "shuffle-r1.redisName" -}}
{{- printf "%s-redis" (include "shuffle-r1.fullname" .) -}}
{{- end -}}

{{/* Secret and key of the Redis password, or "" when Redis runs without one */}}
{{- define "shuffle-r1.redisSecret" -}}
{{- if .Values.redis.auth.existingSecret -}}
{{- .Values.redis.auth.existingSecret -}}
{{- else if .Values.redis.internal -}}
{{- printf "%s-redis" (include "shuffle-r1.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "shuffle-r1.bufferSecret" -}}
{{- .Values.buffer.auth.existingSecret | default (printf "%s-buffer-token" (include "shuffle-r1.fullname" .)) -}}
{{- end -}}

{{- define "shuffle-r1.rewardSecret" -}}
{{- .Values.reward.auth.existingSecret | default (printf "%s-reward-token" (include "shuffle-r1.fullname" .)) -}}
{{- end -}}

{{/* Ray's token: KubeRay's authOptions.secretName, the token under the key auth_token */}}
{{- define "shuffle-r1.raySecret" -}}
{{- .Values.ray.auth.existingSecret | default (printf "%s-ray-token" (include "shuffle-r1.fullname" .)) -}}
{{- end -}}

{{/* where the head mounts the buffer's TLS Secrets */}}
{{- define "shuffle-r1.bufferTlsDir" -}}/etc/shuffle-r1-buffer-tls{{- end -}}
{{- define "shuffle-r1.bufferClientTlsDir" -}}/etc/shuffle-r1-buffer-client-tls{{- end -}}

{{- define "shuffle-r1.redisUrl" -}}
{{- if .Values.redis.internal -}}
{{- printf "redis://%s:6379/%d" (include "shuffle-r1.redisName" .) (int .Values.redis.db) -}}
{{- else -}}
{{- .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* where the trainer reads its recipe */}}
{{- define "shuffle-r1.recipePath" -}}
{{- if .Values.recipe.inline -}}
/etc/shuffle-r1/recipe.yaml
{{- else -}}
{{- printf "/app/%s" (.Values.recipe.file | trimPrefix "/app/") -}}
{{- end -}}
{{- end -}}

{{/*
The recipe keys the chart owns: they must match the pods it renders (Ray resources, GPUs,
worker bounds, ports, addresses). A JSON object, key -> value as the command line has it.
*/}}
{{- define "shuffle-r1.chartOverrides" -}}
{{- $v := .Values -}}
{{- $o := dict -}}
{{- $_ := set $o "cluster.ray_address" "auto" -}}
{{- $_ = set $o "cluster.auth_mode" $v.ray.authMode -}}
{{- $_ = set $o "learner.model_path" $v.model.path -}}
{{- $_ = set $o "learner.num_ranks" (mul (int $v.learner.replicas) (int $v.learner.ranksPerPod) | toString) -}}
{{- $_ = set $o "learner.num_gpus_per_rank" (int $v.learner.gpusPerRank | toString) -}}
{{- $_ = set $o "learner.ray_resources" "{learner: 1}" -}}
{{- $_ = set $o "rollout.num_workers" (int $v.rollout.replicas | toString) -}}
{{- $_ = set $o "rollout.min_workers" (int $v.rollout.minReplicas | toString) -}}
{{- $_ = set $o "rollout.max_workers" (int $v.rollout.maxReplicas | toString) -}}
{{- $_ = set $o "rollout.autoscaling" ($v.rollout.autoscaling | toString) -}}
{{- $_ = set $o "rollout.num_gpus_per_worker" (int $v.rollout.gpusPerWorker | toString) -}}
{{- $_ = set $o "rollout.ray_resources" "{rollout: 1}" -}}
{{- $_ = set $o "reward.http_host" "0.0.0.0" -}}
{{- $_ = set $o "reward.http_port" (int $v.reward.httpPort | toString) -}}
{{- $_ = set $o "buffer.redis_url" (include "shuffle-r1.redisUrl" .) -}}
{{- $_ = set $o "buffer.host" "0.0.0.0" -}}
{{- $_ = set $o "buffer.metrics_port" (int $v.metrics.bufferPort | toString) -}}
{{- if $v.buffer.tls.enabled -}}
{{- $dir := include "shuffle-r1.bufferTlsDir" . -}}
{{- $_ = set $o "buffer.tls_cert" (printf "%s/tls.crt" $dir) -}}
{{- $_ = set $o "buffer.tls_key" (printf "%s/tls.key" $dir) -}}
{{- $_ = set $o "buffer.tls_ca_cert" (printf "%s/ca.crt" $dir) -}}
{{- if $v.buffer.tls.clientSecretName -}}
{{- $client := include "shuffle-r1.bufferClientTlsDir" . -}}
{{- $_ = set $o "buffer.tls_client_ca" (printf "%s/ca.crt" $client) -}}
{{- $_ = set $o "buffer.tls_client_cert" (printf "%s/tls.crt" $client) -}}
{{- $_ = set $o "buffer.tls_client_key" (printf "%s/tls.key" $client) -}}
{{- end -}}
{{- end -}}
{{- $_ = set $o "trainer.metrics_host" "0.0.0.0" -}}
{{- $_ = set $o "trainer.metrics_port" (int $v.metrics.trainerPort | toString) -}}
{{- $_ = set $o "trainer.output_dir" (printf "%s/%s" (trimSuffix "/" $v.outputs.mountPath) .Release.Name) -}}
{{- toJson $o -}}
{{- end -}}

{{/* one override value as OmegaConf's dotlist reads it (Helm holds numbers as float64) */}}
{{- define "shuffle-r1.overrideValue" -}}
{{- if or (kindIs "map" .) (kindIs "slice" .) -}}
{{- toJson . -}}
{{- else if and (kindIs "float64" .) (eq . (float64 (int64 .))) -}}
{{- int64 . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/* `shuffle-r1 train` with the recipe, the chart's keys, then the user's overrides */}}
{{- define "shuffle-r1.trainCommand" -}}
{{- $args := list "shuffle-r1" "train" "--config" (include "shuffle-r1.recipePath" .) -}}
{{- range $k, $val := (include "shuffle-r1.chartOverrides" . | fromJson) -}}
{{- $args = append $args (printf "%s=%s" $k $val) -}}
{{- end -}}
{{- range $k, $val := .Values.recipe.overrides -}}
{{- $args = append $args (printf "%s=%s" $k (include "shuffle-r1.overrideValue" $val)) -}}
{{- end -}}
{{- $quoted := list -}}
{{- range $args -}}
{{- $quoted = append $quoted (squote .) -}}
{{- end -}}
cd /app && exec {{ join " " $quoted }}
{{- end -}}

{{/* resources of a Ray container: requests = limits (Ray sizes itself from the limits) */}}
{{- define "shuffle-r1.rayResources" -}}
{{- $r := dict "cpu" (.resources.cpu | toString) "memory" (.resources.memory | toString) -}}
{{- if gt (int .gpus) 0 -}}
{{- $_ := set $r "nvidia.com/gpu" (int .gpus | toString) -}}
{{- end -}}
requests:
  {{- toYaml $r | nindent 2 }}
limits:
  {{- toYaml $r | nindent 2 }}
{{- end -}}

{{/* Ray's rayStartParams `resources` string: '"{\"rollout\": 1}"' */}}
{{- define "shuffle-r1.rayCustomResources" -}}
{{- printf "\"%s\"" (toJson . | replace "\"" "\\\"") -}}
{{- end -}}

{{- define "shuffle-r1.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "shuffle-r1.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
{{- end -}}
