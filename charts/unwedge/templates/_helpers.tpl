{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "unwedge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object name: the release name, plus the chart name unless it already has it. */}}
{{- define "unwedge.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "unwedge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "unwedge.labels" -}}
helm.sh/chart: {{ include "unwedge.chart" . }}
app.kubernetes.io/name: {{ include "unwedge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: unwedge
{{- end -}}

{{/* Selector labels of one component ("agent" or "operator"); pass (list $ "agent"). */}}
{{- define "unwedge.selectorLabels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "unwedge.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "unwedge.agentServiceAccountName" -}}
{{- default (printf "%s-agent" (include "unwedge.fullname" .)) .Values.agent.serviceAccount.name -}}
{{- end -}}

{{- define "unwedge.operatorServiceAccountName" -}}
{{- default (printf "%s-operator" (include "unwedge.fullname" .)) .Values.operator.serviceAccount.name -}}
{{- end -}}

{{/* The username the API server gives the agent's ServiceAccount tokens. */}}
{{- define "unwedge.agentUsername" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "unwedge.agentServiceAccountName" .) -}}
{{- end -}}

{{/*
An image reference from (list $ .Values.<component>.image): global.imageRegistry as a prefix when
set; pinned by digest (repo@digest, the tag ignored) when image.digest is set, else repo:tag.
*/}}
{{- define "unwedge.image" -}}
{{- $ := index . 0 -}}
{{- $img := index . 1 -}}
{{- $repo := $img.repository -}}
{{- with ($.Values.global).imageRegistry -}}
{{- $repo = printf "%s/%s" (trimSuffix "/" .) $repo -}}
{{- end -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $repo $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default $.Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{- define "unwedge.agentImage" -}}
{{- include "unwedge.image" (list . .Values.agent.image) -}}
{{- end -}}

{{- define "unwedge.operatorImage" -}}
{{- include "unwedge.image" (list . .Values.operator.image) -}}
{{- end -}}

{{/*
The agent's affinity: agent.affinity with the opt-out (agent.optOutLabel NotIn ["true"]) added to
every required node selector term (terms are ORed, so each needs it); with no required terms,
one term holding only the opt-out.
*/}}
{{- define "unwedge.agentAffinity" -}}
{{- $aff := deepCopy (.Values.agent.affinity | default dict) -}}
{{- with .Values.agent.optOutLabel -}}
{{- $optOut := dict "key" . "operator" "NotIn" "values" (list "true") -}}
{{- $na := get $aff "nodeAffinity" | default dict -}}
{{- $req := get $na "requiredDuringSchedulingIgnoredDuringExecution" | default dict -}}
{{- $terms := list -}}
{{- range (get $req "nodeSelectorTerms" | default (list dict)) -}}
{{- $exprs := append (get . "matchExpressions" | default list) $optOut -}}
{{- $terms = append $terms (merge (dict "matchExpressions" $exprs) .) -}}
{{- end -}}
{{- $_ := set $req "nodeSelectorTerms" $terms -}}
{{- $_ = set $na "requiredDuringSchedulingIgnoredDuringExecution" $req -}}
{{- $_ = set $aff "nodeAffinity" $na -}}
{{- end -}}
{{- if $aff -}}
{{- toYaml $aff -}}
{{- end -}}
{{- end -}}

{{/*
Whether the DRA parts render: "true" or "false". auto follows the cluster: on when it serves
resource.k8s.io/v1 DeviceTaintRule (helm template: pass --api-versions resource.k8s.io/v1/DeviceTaintRule).
*/}}
{{- define "unwedge.draEnabled" -}}
{{- $v := toString .Values.dra.enabled -}}
{{- if eq $v "true" -}}true
{{- else if eq $v "false" -}}false
{{- else if .Capabilities.APIVersions.Has "resource.k8s.io/v1/DeviceTaintRule" -}}true
{{- else -}}false
{{- end -}}
{{- end -}}

{{/* The operator's --dra flag: follows what the chart rendered, so the operator never uses DRA without the RBAC for it. */}}
{{- define "unwedge.draFlag" -}}
{{- if eq (include "unwedge.draEnabled" .) "true" -}}on{{- else -}}off{{- end -}}
{{- end -}}

{{/*
The default RecoveryPolicy (YAML), from .Values.defaultPolicy; default-policy.yaml renders it
into the ConfigMap the operator applies.
*/}}
{{- define "unwedge.defaultPolicy" -}}
{{- $p := .Values.defaultPolicy -}}
apiVersion: unwedge.io/v1alpha1
kind: RecoveryPolicy
metadata:
  name: {{ $p.name }}
  labels:
    {{- include "unwedge.labels" . | fromYaml | merge (dict "app.kubernetes.io/managed-by" "unwedge-operator") | toYaml | nindent 4 }}
spec:
  default: true
  maxUnavailable: {{ $p.maxUnavailable | toJson }}
  maxConcurrentReboots: {{ $p.maxConcurrentReboots }}
  maxUnavailableDevices: {{ $p.maxUnavailableDevices | toJson }}
  approval: {{ $p.approval }}
  {{- with $p.rebootApproval }}
  rebootApproval: {{ . }}
  {{- end }}
  allowedMethods: {{ $p.allowedMethods | toJson }}
  escalation: {{ $p.escalation | toJson }}
  drain:
    {{- toYaml $p.drain | nindent 4 }}
  none:
    {{- toYaml $p.none | nindent 4 }}
  verifyTimeout: {{ $p.verifyTimeout | quote }}
  maxAttempts: {{ $p.maxAttempts }}
  {{- with $p.repeatOffender }}
  repeatOffender:
    count: {{ .count }}
    window: {{ .window | quote }}
  {{- end }}
  {{- with $p.circuitBreaker }}
  circuitBreaker:
    count: {{ .count }}
    window: {{ .window | quote }}
  {{- end }}
  paused: {{ $p.paused }}
  dryRun: {{ $p.dryRun }}
  historyLimit: {{ $p.historyLimit }}
{{- end }}
