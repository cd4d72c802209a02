{{/* Chart name, 63 characters at most. */}}
{{- define "mdl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified name: <release>-<chart> (or the override), 63 characters at most. */}}
{{- define "mdl.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* fullname plus a suffix, the whole within 63 characters: (dict "ctx" . "suffix" "test"). */}}
{{- define "mdl.suffixed" -}}
{{- $suffix := printf "-%s" .suffix -}}
{{- printf "%s%s" (include "mdl.fullname" .ctx | trunc (int (sub 63 (len $suffix))) | trimSuffix "-") $suffix -}}
{{- end -}}

{{- define "mdl.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Selector labels: fixed at install, never built from user-editable values (commonLabels,
podLabels, chart or app version), so `helm upgrade` never changes an immutable selector.
*/}}
{{- define "mdl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mdl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end -}}

{{/* Labels of every resource: the chart's own win over commonLabels of the same key. */}}
{{- define "mdl.labels" -}}
{{- $own := dict
  "helm.sh/chart" (include "mdl.chart" .)
  "app.kubernetes.io/name" (include "mdl.name" .)
  "app.kubernetes.io/instance" .Release.Name
  "app.kubernetes.io/version" (toString .Chart.AppVersion)
  "app.kubernetes.io/managed-by" .Release.Service
  "app.kubernetes.io/part-of" "midashenglm-serve" -}}
{{- toYaml (merge $own (deepCopy (.Values.commonLabels | default dict))) -}}
{{- end -}}

{{/* Labels of the server pods: selector labels win over everything else. */}}
{{- define "mdl.podLabels" -}}
{{- $sel := include "mdl.selectorLabels" . | fromYaml -}}
{{- $all := include "mdl.labels" . | fromYaml -}}
{{- toYaml (merge $sel $all (deepCopy (.Values.podLabels | default dict))) -}}
{{- end -}}

{{- define "mdl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mdl.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mdl.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Secret holding the API keys and its key. */}}
{{- define "mdl.secretName" -}}
{{- default (include "mdl.suffixed" (dict "ctx" . "suffix" "api-keys")) .Values.auth.existingSecret -}}
{{- end -}}
{{- define "mdl.secretKey" -}}
{{- if .Values.auth.existingSecret -}}{{ .Values.auth.existingSecretKey }}{{- else -}}api-keys{{- end -}}
{{- end -}}

{{/* GPUs per pod: one tensor-parallel group per data-parallel engine replica. */}}
{{- define "mdl.gpus" -}}
{{- mul (int .Values.server.dataParallelSize) (int .Values.server.tensorParallelSize) -}}
{{- end -}}

{{/* Directory of the checkpoint inside the container. */}}
{{- define "mdl.modelDir" -}}
{{- if .Values.model.path -}}{{ printf "/models/%s" (trimAll "/" .Values.model.path) }}{{- else -}}/models{{- end -}}
{{- end -}}

{{/* Prometheus metric the autoscaler follows. */}}
{{- define "mdl.scaleMetric" -}}
{{- if eq .Values.autoscaling.metric "queue_length" -}}mdl_queue_length{{- else -}}mdl_clips_in_flight{{- end -}}
{{- end -}}

{{/*
Refuse unsafe or contradictory values. Included by the Deployment, so every render checks.
*/}}
{{- define "mdl.validate" -}}
{{- $v := .Values -}}
{{- $grace := int $v.terminationGracePeriodSeconds -}}
{{- $needed := add (int $v.preStopSleepSeconds) (int $v.server.drainTimeout) -}}
{{- if le $grace (int $needed) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + server.drainTimeout (%d): the pod would be killed before in-flight requests drain" $grace (int $needed)) -}}
{{- end -}}
{{- if and $v.auth.existingSecret $v.auth.apiKeys -}}
{{- fail "set either auth.existingSecret or auth.apiKeys, not both" -}}
{{- end -}}
{{- if and $v.auth.enabled (not $v.auth.existingSecret) (not $v.auth.apiKeys) (not $v.auth.generate) -}}
{{- fail "auth.enabled needs API keys: set auth.existingSecret, auth.apiKeys or auth.generate=true (or auth.enabled=false)" -}}
{{- end -}}
{{- if and $v.ingress.enabled (not $v.auth.enabled) (not $v.ingress.allowUnauthenticated) -}}
{{- fail "ingress.enabled with auth.enabled=false exposes the model without API keys; set ingress.allowUnauthenticated=true if that is intended" -}}
{{- end -}}
{{- range $section := list "requests" "limits" -}}
{{- if hasKey (index $v.resources $section | default dict) $v.gpuResourceName -}}
{{- fail (printf "do not set resources.%s.%s: the chart requests server.dataParallelSize x server.tensorParallelSize GPUs" $section $v.gpuResourceName) -}}
{{- end -}}
{{- end -}}
{{- if and (eq $v.model.source "pvc") (not $v.model.pvc.claimName) -}}
{{- fail "model.source=pvc needs model.pvc.claimName" -}}
{{- end -}}
{{- if and (eq $v.model.source "download") (not $v.model.download.command) -}}
{{- fail "model.source=download needs model.download.command (it must write the checkpoint to /models/<model.path>)" -}}
{{- end -}}
{{- if and (eq $v.compileCache.type "pvc") (not $v.compileCache.pvc.claimName) -}}
{{- fail "compileCache.type=pvc needs compileCache.pvc.claimName" -}}
{{- end -}}
{{- if and $v.podDisruptionBudget.enabled (not (kindIs "invalid" $v.podDisruptionBudget.minAvailable)) (not (kindIs "invalid" $v.podDisruptionBudget.maxUnavailable)) -}}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable, not both" -}}
{{- end -}}
{{- if and $v.podDisruptionBudget.enabled (not $v.autoscaling.enabled) (not (kindIs "invalid" $v.podDisruptionBudget.minAvailable)) -}}
{{- if and (not (kindIs "string" $v.podDisruptionBudget.minAvailable)) (ge (int $v.podDisruptionBudget.minAvailable) (int $v.replicaCount)) -}}
{{- fail (printf "podDisruptionBudget.minAvailable (%d) >= replicaCount (%d) blocks every node drain" (int $v.podDisruptionBudget.minAvailable) (int $v.replicaCount)) -}}
{{- end -}}
{{- end -}}
{{- if $v.autoscaling.enabled -}}
{{- if gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas) -}}
{{- fail (printf "autoscaling.minReplicas (%d) > autoscaling.maxReplicas (%d)" (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- if and (eq $v.autoscaling.kind "keda") (not $v.autoscaling.keda.serverAddress) -}}
{{- fail "autoscaling.kind=keda needs autoscaling.keda.serverAddress (the Prometheus KEDA queries)" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The checkpoint, caches and scratch space of a pod running the engine (server and batch
pods): the model read-only at /models; writable /cache, /dev/shm, /tmp and /home/mdl under
a read-only root filesystem.
*/}}
{{- define "mdl.modelFetchContainer" -}}
- name: fetch-model
  image: {{ .Values.model.download.image }}
  imagePullPolicy: IfNotPresent
  command:
    {{- toYaml .Values.model.download.command | nindent 4 }}
  {{- with .Values.model.download.env }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  {{- with .Values.model.download.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: model
      mountPath: /models
    - name: tmp
      mountPath: /tmp
{{- end -}}

{{- define "mdl.serverVolumeMounts" -}}
- name: model
  mountPath: /models
  readOnly: true
- name: compile-cache
  mountPath: /cache
- name: dshm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/mdl
{{- end -}}

{{- define "mdl.serverVolumes" -}}
- name: model
  {{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
  {{- else if eq .Values.model.source "hostPath" }}
  hostPath:
    path: {{ .Values.model.hostPath.path }}
    type: Directory
  {{- else }}
  emptyDir:
    sizeLimit: {{ .Values.model.download.sizeLimit }}
  {{- end }}
- name: compile-cache
  {{- if eq .Values.compileCache.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.compileCache.pvc.claimName }}
  {{- else if eq .Values.compileCache.type "hostPath" }}
  hostPath:
    path: {{ .Values.compileCache.hostPath.path }}
    type: DirectoryOrCreate
  {{- else }}
  emptyDir:
    sizeLimit: {{ .Values.compileCache.sizeLimit }}
  {{- end }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shm.sizeLimit }}
- name: tmp
  emptyDir:
    sizeLimit: 4Gi
- name: home
  emptyDir:
    sizeLimit: 1Gi
{{- end -}}
