using System.Diagnostics;
using OffloadRpc.Interop;

namespace OffloadRpc.Cli;

/// <summary>
/// The floor for a round trip: two processes hand a counter back and forth through one shared
/// cache line each way, spinning, with nothing else in the path.
/// </summary>
internal static unsafe partial class PingPong
{
    [System.Runtime.InteropServices.LibraryImport("libc", EntryPoint = "open", SetLastError = true, StringMarshalling = System.Runtime.InteropServices.StringMarshalling.Utf8)]
    private static partial int Open(string path, int flags);

    private const int O_RDWR = 2;

    private const int Size = 4096;

    /// <summary>Runs the partner side: echoes every ping until told to stop (ping = -1).</summary>
    public static int RunPartner(int parentPid, int fd)
    {
        int local = Open($"/proc/{parentPid}/fd/{fd}", O_RDWR);
        if (local < 0)
        {
            Console.Error.WriteLine("cannot open the parent's memfd");
            return 1;
        }

        byte* map = (byte*)LinuxNative.Mmap(0, Size, LinuxNative.PROT_READ | LinuxNative.PROT_WRITE, LinuxNative.MAP_SHARED, local, 0);
        long* ping = (long*)map;
        long* pong = (long*)(map + 128);
        Volatile.Write(ref *pong, -2); // ready
        long last = 0;
        while (true)
        {
            long value = Volatile.Read(ref *ping);
            if (value == last)
            {
                Thread.SpinWait(1);
                continue;
            }

            if (value < 0)
            {
                return 0;
            }

            last = value;
            Volatile.Write(ref *pong, value);
        }
    }

    /// <summary>Measures round trips; returns per-round-trip nanoseconds for each batch. <paramref name="startPartner"/> starts <see cref="RunPartner"/> in another process, given this process's id and the memfd.</summary>
    public static double[] Measure(int batches, int perBatch, Func<int, int, Process> startPartner)
    {
        int fd = LinuxNative.MemfdCreate("offloadrpc-pingpong", 0);
        LinuxNative.Ftruncate(fd, Size);
        byte* map = (byte*)LinuxNative.Mmap(0, Size, LinuxNative.PROT_READ | LinuxNative.PROT_WRITE, LinuxNative.MAP_SHARED, fd, 0);
        long* ping = (long*)map;
        long* pong = (long*)(map + 128);
        using Process partner = startPartner(Environment.ProcessId, fd);
        try
        {
            var wait = Stopwatch.StartNew();
            while (Volatile.Read(ref *pong) != -2)
            {
                if (wait.Elapsed > TimeSpan.FromSeconds(30))
                {
                    throw new TimeoutException("the ping-pong partner did not start");
                }

                Thread.Sleep(1);
            }

            long counter = 0;
            var results = new double[batches];
            for (int b = -10; b < batches; b++)
            {
                long start = Stopwatch.GetTimestamp();
                for (int i = 0; i < perBatch; i++)
                {
                    counter++;
                    Volatile.Write(ref *ping, counter);
                    while (Volatile.Read(ref *pong) != counter)
                    {
                        Thread.SpinWait(1);
                    }
                }

                if (b >= 0)
                {
                    results[b] = Stopwatch.GetElapsedTime(start).TotalNanoseconds / perBatch;
                }
            }

            Volatile.Write(ref *ping, -1);
            partner.WaitForExit(10_000);
            return results;
        }
        finally
        {
            if (!partner.HasExited)
            {
                partner.Kill();
            }

            LinuxNative.Munmap((nint)map, Size);
            LinuxNative.Close(fd);
        }
    }
}

