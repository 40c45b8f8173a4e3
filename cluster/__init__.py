"""Where crucible runs and what it costs: the cluster spec (:mod:`.spec`), the hardware
catalogue (:mod:`.hardware`), the one planner (:mod:`.plan`: memory, step time, fitting,
alternatives, and what every rank runs), the storage layer every artefact goes through
(:mod:`.storage`), the local embedded cluster (:mod:`.local`: a token-authenticated Ray head
and a Prometheus beside it), the Prometheus scrape config every cluster uses
(:mod:`.scrape`), and the launcher and KubeRay configs sized from a plan (:mod:`.launch`,
:mod:`.kuberay`). It schedules nothing itself: Ray does that."""
