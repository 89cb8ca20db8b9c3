"""MCU deployment: integer graph, schedules, memory planner, C codegen, boards, build, flash, serial link."""
