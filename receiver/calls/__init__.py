"""Calls: the two taps of one call (its `speak` and `listen` legs) put side by side in one stereo
WAV, `<call-id>.wav`, next to the legs' own files.

`legs.py` says which call and leg a finished tap belongs to and where each leg begins on the
call's timeline (pure); `assembler.py` collects the finished legs on the event loop and has the
disk writer build the call's file (receiver.storage.call_file) once both have ended.
"""
