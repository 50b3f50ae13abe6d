using System.Runtime.InteropServices;

namespace OffloadRpc.Cli;

/// <summary>
/// CPU time of a whole process (every thread), in nanoseconds: this process's, or another's through
/// its CPU-time clock (<c>clock_getcpuclockid</c>), so a benchmark client reads its server's CPU time
/// at the start and the end of a cell without asking the server (which would add a call to what is
/// measured). Shared by the CLI's bench and ping-pong floor and the peer benchmark (linked there).
/// </summary>
internal sealed partial class ProcessCpu
{
    private const int CLOCK_PROCESS_CPUTIME_ID = 2;
    private const int CLOCK_THREAD_CPUTIME_ID = 3;

    private readonly int _clock;

    private ProcessCpu(int clock) => _clock = clock;

    public static ProcessCpu Self { get; } = new(CLOCK_PROCESS_CPUTIME_ID);

    public static ProcessCpu Of(int processId)
    {
        int error = GetCpuClockId(processId, out int clock);
        if (error != 0)
        {
            throw new InvalidOperationException($"clock_getcpuclockid({processId}) failed with error {error}: the server's CPU time cannot be measured.");
        }

        var cpu = new ProcessCpu(clock);
        _ = cpu.Nanoseconds; // fail now, not in the middle of a cell
        return cpu;
    }

    public long Nanoseconds => Read(_clock);

    /// <summary>The calling thread's CPU time.</summary>
    public static long ThreadNanoseconds => Read(CLOCK_THREAD_CPUTIME_ID);

    private static long Read(int clock)
    {
        if (ClockGetTime(clock, out Timespec time) != 0)
        {
            throw new InvalidOperationException($"clock_gettime({clock}) failed with error {Marshal.GetLastPInvokeError()} (has the process exited?).");
        }

        return (time.Seconds * 1_000_000_000) + time.Nanoseconds;
    }

    private struct Timespec
    {
        public long Seconds;
        public long Nanoseconds;
    }

    [LibraryImport("libc", EntryPoint = "clock_getcpuclockid")]
    private static partial int GetCpuClockId(int pid, out int clock);

    [LibraryImport("libc", EntryPoint = "clock_gettime", SetLastError = true)]
    private static partial int ClockGetTime(int clock, out Timespec time);
}
