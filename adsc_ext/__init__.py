from .schedule import LLAVA15_DEFAULT, Schedule, ScheduleError
