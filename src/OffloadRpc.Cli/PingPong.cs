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

    [System.Runtime.InteropServices.LibraryImport("libc", EntryPoint = "getppid")]
    private static partial int GetParentProcessId();

    private const int O_RDWR = 2;

    private const int Size = 4096;

    private const int PartnerReadyCpuOffset = 256;

    private const int PartnerDoneCpuOffset = 264;


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
        long idle = 0;
        while (true)
        {
            long value = Volatile.Read(ref *ping);
            if (value == last)
            {
                Thread.SpinWait(1);
                if ((++idle & 0xF_FFFF) == 0 && GetParentProcessId() != parentPid)
                {
                    return 1; // the measuring process died without saying stop: do not spin forever
                }

                continue;
            }

            idle = 0;
            if (last == 0)
            {
                *(long*)(map + PartnerReadyCpuOffset) = ProcessCpu.Self.Nanoseconds; // the measured span starts with the first ping, on both sides
            }


            if (value < 0)
            {
                Volatile.Write(ref *(long*)(map + PartnerDoneCpuOffset), ProcessCpu.Self.Nanoseconds); // read by Measure once this process has exited
                return 0;
            }

            last = value;
            Volatile.Write(ref *pong, value);
        }
    }

    /// <summary>Measures round trips; returns per-round-trip nanoseconds for each batch. <paramref name="startPartner"/> starts <see cref="RunPartner"/> in another process, given this process's id and the memfd.</summary>
    public static double[] Measure(int batches, int perBatch, Func<int, int, Process> startPartner) => Measure(batches, perBatch, startPartner, out _);

    /// <summary>
    /// As <see cref="Measure(int, int, Func{int, int, Process})"/>; also gives the CPU time both processes
    /// spent from the partner's start signal to its stop (warm-up batches included), and the number of
    /// round trips in that span. The partner's part is -1 if it did not report it.
    /// </summary>
    public static double[] Measure(int batches, int perBatch, Func<int, int, Process> startPartner, out PingPongCpu cpu)
    {
        cpu = new PingPongCpu(0, -1, 0);
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
            long clientCpuStart = ProcessCpu.Self.Nanoseconds;
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
            long clientCpu = ProcessCpu.Self.Nanoseconds - clientCpuStart;
            long partnerCpu = -1;
            if (partner.WaitForExit(10_000) && partner.ExitCode == 0)
            {
                partnerCpu = Volatile.Read(ref *(long*)(map + PartnerDoneCpuOffset)) - Volatile.Read(ref *(long*)(map + PartnerReadyCpuOffset));
            }

            cpu = new PingPongCpu(clientCpu, partnerCpu, counter);

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

/// <summary>CPU time of both ping-pong processes over <see cref="RoundTrips"/> round trips (nanoseconds; the partner's is -1 if unknown).</summary>
internal readonly record struct PingPongCpu(long ClientNanoseconds, long PartnerNanoseconds, long RoundTrips);
