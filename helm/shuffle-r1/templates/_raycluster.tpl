{{/*
The RayCluster spec, shared by the RayJob (spec.rayClusterSpec) and the RayCluster (spec).
*/}}
{{- define "shuffle-r1.rayClusterSpec" -}}
{{- $v := .Values -}}
rayVersion: {{ $v.rayVersion | quote }}
enableInTreeAutoscaling: true
autoscalerOptions:
  upscalingMode: {{ $v.ray.autoscaler.upscalingMode }}
  idleTimeoutSeconds: {{ int $v.ray.autoscaler.idleTimeoutSeconds }}
  resources:
    requests: {cpu: 500m, memory: 512Mi}
    limits: {cpu: 500m, memory: 512Mi}
  securityContext:
    {{- include "shuffle-r1.containerSecurityContext" . | nindent 4 }}
authOptions:
  mode: {{ $v.ray.authMode }}
  secretName: {{ include "shuffle-r1.raySecret" . }}
headGroupSpec:
  rayStartParams:
    metrics-export-port: {{ int $v.ray.metricsExportPort | quote }}
    num-gpus: "0"
  template:
    {{- include "shuffle-r1.rayPod" (dict "root" . "component" "head" "group" $v.head "gpus" 0) | nindent 4 }}
workerGroupSpecs:
  - groupName: rollout
    replicas: {{ int $v.rollout.replicas }}
    minReplicas: {{ int $v.rollout.minReplicas }}
    maxReplicas: {{ int $v.rollout.maxReplicas }}
    rayStartParams:
      metrics-export-port: {{ int $v.ray.metricsExportPort | quote }}
      resources: {{ include "shuffle-r1.rayCustomResources" (dict "rollout" 1) | squote }}
    template:
      {{- include "shuffle-r1.rayPod" (dict "root" . "component" "rollout" "group" $v.rollout "gpus" $v.rollout.gpusPerWorker) | nindent 6 }}
  - groupName: learner
    replicas: {{ int $v.learner.replicas }}
    minReplicas: {{ int $v.learner.replicas }}
    maxReplicas: {{ int $v.learner.replicas }}
    rayStartParams:
      metrics-export-port: {{ int $v.ray.metricsExportPort | quote }}
      resources: {{ include "shuffle-r1.rayCustomResources" (dict "learner" (int $v.learner.ranksPerPod)) | squote }}
    template:
      {{- include "shuffle-r1.rayPod" (dict "root" . "component" "learner" "group" $v.learner "gpus" (mul (int $v.learner.ranksPerPod) (int $v.learner.gpusPerRank))) | nindent 6 }}
{{- end -}}

{{/*
A Ray pod template: (dict "root" $ "component" head|rollout|learner "group" <values> "gpus" N).
The head runs the trainer and the replay buffer: it alone gets the secrets, the recipe and
the metrics ports; head and learner pods write checkpoints to the outputs volume.
*/}}
{{- define "shuffle-r1.rayPod" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $head := eq .component "head" -}}
{{- $writes := or $head (eq .component "learner") -}}
{{- $redisSecret := include "shuffle-r1.redisSecret" $root -}}
metadata:
  labels:
    {{- include "shuffle-r1.labels" (dict "root" $root "component" .component) | nindent 4 }}
    shuffle-r1/ray-node: "true"
spec:
  securityContext:
    {{- include "shuffle-r1.podSecurityContext" . | nindent 4 }}
  {{- with $v.image.pullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" $head }}
      image: "{{ $v.image.repository }}:{{ $v.image.tag }}"
      imagePullPolicy: {{ $v.image.pullPolicy }}
      securityContext:
        {{- include "shuffle-r1.containerSecurityContext" . | nindent 8 }}
      ports:
        - name: metrics
          containerPort: {{ int $v.ray.metricsExportPort }}
        {{- if $head }}
        - name: trainer-metrics
          containerPort: {{ int $v.metrics.trainerPort }}
        - name: buffer-metrics
          containerPort: {{ int $v.metrics.bufferPort }}
        - name: serve
          containerPort: {{ int $v.reward.httpPort }}
        {{- end }}
      {{- if or $v.ray.env $head }}
      env:
        {{- if $head }}
        {{- if $redisSecret }}
        - name: SHUFFLE_R1_REDIS_PASSWORD
          valueFrom:
            secretKeyRef:
              name: {{ $redisSecret }}
              key: {{ $v.redis.auth.secretKey }}
        {{- end }}
        - name: SHUFFLE_R1_BUFFER_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ include "shuffle-r1.bufferSecret" $root }}
              key: {{ $v.buffer.auth.secretKey }}
        - name: SHUFFLE_R1_REWARD_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ include "shuffle-r1.rewardSecret" $root }}
              key: {{ $v.reward.auth.secretKey }}
        {{- end }}
        {{- with $v.ray.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      resources:
        {{- include "shuffle-r1.rayResources" (dict "resources" .group.resources "gpus" .gpus) | nindent 8 }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        {{- if $v.model.volume.existingClaim }}
        - name: models
          mountPath: {{ $v.model.volume.mountPath }}
          readOnly: true
        {{- end }}
        {{- if $writes }}
        - name: outputs
          mountPath: {{ $v.outputs.mountPath }}
        {{- end }}
        {{- if and $head $v.recipe.inline }}
        - name: recipe
          mountPath: /etc/shuffle-r1
          readOnly: true
        {{- end }}
        {{- if and $head $v.buffer.tls.enabled }}
        - name: buffer-tls
          mountPath: {{ include "shuffle-r1.bufferTlsDir" $root }}
          readOnly: true
        {{- if $v.buffer.tls.clientSecretName }}
        - name: buffer-client-tls
          mountPath: {{ include "shuffle-r1.bufferClientTlsDir" $root }}
          readOnly: true
        {{- end }}
        {{- end }}
  volumes:
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $v.ray.shmSize }}
    {{- if $v.model.volume.existingClaim }}
    - name: models
      persistentVolumeClaim:
        claimName: {{ $v.model.volume.existingClaim }}
        readOnly: true
    {{- end }}
    {{- if $writes }}
    - name: outputs
      {{- if $v.outputs.existingClaim }}
      persistentVolumeClaim:
        claimName: {{ $v.outputs.existingClaim }}
      {{- else }}
      emptyDir: {}
      {{- end }}
    {{- end }}
    {{- if and $head $v.recipe.inline }}
    - name: recipe
      configMap:
        name: {{ include "shuffle-r1.fullname" $root }}-recipe
    {{- end }}
    {{- if and $head $v.buffer.tls.enabled }}
    - name: buffer-tls
      secret:
        secretName: {{ $v.buffer.tls.secretName }}
        defaultMode: 0400
    {{- if $v.buffer.tls.clientSecretName }}
    - name: buffer-client-tls
      secret:
        secretName: {{ $v.buffer.tls.clientSecretName }}
        defaultMode: 0400
    {{- end }}
    {{- end }}
{{- end -}}
