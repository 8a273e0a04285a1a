"""The coordinator: a FastAPI service (:mod:`~cardiofed.coordinator.app`) whose routers
call rooms named for what they do: :mod:`~cardiofed.coordinator.administration`,
:mod:`~cardiofed.coordinator.enrolment`, :mod:`~cardiofed.coordinator.uploads`,
:mod:`~cardiofed.coordinator.checks`, :mod:`~cardiofed.coordinator.rounds`,
:mod:`~cardiofed.coordinator.buffer`, :mod:`~cardiofed.coordinator.models`,
:mod:`~cardiofed.coordinator.status`, :mod:`~cardiofed.coordinator.regional` and
:mod:`~cardiofed.coordinator.attribution`, over what they share
(:mod:`~cardiofed.coordinator.studies`) and the store (:mod:`cardiofed.store`)."""
