using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>The budget of a gRPC server's request buffers (and of a client's replies): what it counts, what it refuses, what it gets back.</summary>
public sealed class LeaseBudgetTests
{
    [Fact]
    public void A_client_s_budget_of_replies_names_its_own_option_when_it_refuses()
    {
        var budget = new LeaseBudget(64 << 10, forReplies: true);
        using SharedBuffer lease = budget.Rent(64 << 10);
        ArenaExhaustedException refused = Assert.Throws<ArenaExhaustedException>(() => budget.Rent(1));
        Assert.Contains("OffloadRpcOptions.MaxBufferedReplyBytes", refused.Message, StringComparison.Ordinal);
        Assert.Contains("client's memory", refused.Message, StringComparison.Ordinal);
        Assert.DoesNotContain("MaxBufferedRequestBytes", refused.Message, StringComparison.Ordinal);
        Assert.False(budget.CountsHeads); // a reply head is bounded by MaxMessageBytes, on every call path alike
        Assert.True(new LeaseBudget(1).CountsHeads);
    }

    [Fact]
    public void A_lease_counts_its_whole_mapping_until_it_is_disposed()
    {
        var budget = new LeaseBudget(1 << 20);
        using (SharedBuffer lease = budget.Rent(5000))
        {
            Assert.Equal(5000, lease.Length);
            Assert.Equal(8192, budget.HeldBytes); // two pages: the mapping it holds
            lease.Span.Fill(7);
        }

        Assert.Equal(0, budget.HeldBytes);
    }

    [Fact]
    public void A_lease_past_the_limit_is_refused_and_the_room_comes_back_with_the_leases()
    {
        var budget = new LeaseBudget(1 << 20);
        SharedBuffer half = budget.Rent(512 << 10);
        ArenaExhaustedException refused = Assert.Throws<ArenaExhaustedException>(() => budget.Rent(600 << 10));
        Assert.Contains("MaxBufferedRequestBytes", refused.Message, StringComparison.Ordinal);
        Assert.Equal(512 << 10, budget.HeldBytes); // the refusal took nothing

        SharedBuffer rest = budget.Rent(512 << 10); // exactly the limit
        Assert.Equal(1 << 20, budget.HeldBytes);
        Assert.Throws<ArenaExhaustedException>(() => budget.Rent(1));
        Assert.Throws<ArenaExhaustedException>(() => budget.Rent(0)); // an empty buffer is a mapping of a page too
        Assert.Equal(1 << 20, budget.HeldBytes);

        half.Dispose();
        half.Dispose(); // a second dispose gives nothing back twice
        Assert.Equal(512 << 10, budget.HeldBytes);
        using (SharedBuffer again = budget.Rent(300 << 10))
        {
            Assert.Equal(1 << 20, budget.HeldBytes); // 300 KiB is a mapping of 512 KiB
        }

        rest.Dispose();
        Assert.Equal(0, budget.HeldBytes);
    }

    [Fact]
    public void A_lease_is_refused_by_the_size_of_its_mapping_so_the_held_bytes_never_pass_the_limit()
    {
        var budget = new LeaseBudget(64L << 20);
        var leases = Enumerable.Range(0, 5).Select(_ => budget.Rent(8 << 20)).ToList(); // 40 MiB
        Assert.Equal(16L << 20, LocalLeases.MappingSize((16 << 20) - 1));
        Assert.Equal(32L << 20, LocalLeases.MappingSize((16 << 20) + 1)); // a power of two of pages up to 32 MiB
        Assert.Equal((32L << 20) + 4096, LocalLeases.MappingSize((32 << 20) + 1)); // whole pages above
        Assert.Throws<ArenaExhaustedException>(() => budget.Rent((16 << 20) + 1)); // 24 MiB left: its 16 MiB + 1 byte map 32
        Assert.Equal(40L << 20, budget.HeldBytes);
        leases.Add(budget.Rent(16 << 20));
        Assert.Equal(56L << 20, budget.HeldBytes);

        // A large request frame kept while its call runs counts too.
        Assert.Throws<ArenaExhaustedException>(() => budget.Reserve(16L << 20, "a request frame"));
        budget.Reserve(8L << 20, "a request frame");
        Assert.Equal(64L << 20, budget.HeldBytes);
        budget.Release(8L << 20);

        leases.ForEach(lease => lease.Dispose());
        Assert.Equal(0, budget.HeldBytes);
    }

    [Fact]
    public async Task Leases_rented_and_given_back_from_many_threads_never_take_more_than_the_limit_and_all_come_back()
    {
        var budget = new LeaseBudget(1 << 20);
        long most = 0;
        int refused = 0;
        await Task.WhenAll(Enumerable.Range(0, 4).Select(t => Task.Run(() =>
        {
            var random = new Random(t);
            for (int i = 0; i < 2000; i++)
            {
                try
                {
                    using SharedBuffer lease = budget.Rent(random.Next(1, 300 << 10));
                    long held = budget.HeldBytes;
                    long seen;
                    while (held > (seen = Interlocked.Read(ref most)) && Interlocked.CompareExchange(ref most, held, seen) != seen)
                    {
                    }
                }
                catch (ArenaExhaustedException)
                {
                    Interlocked.Increment(ref refused);
                }
            }
        })));

        Assert.InRange(most, 4096, 1 << 20);
        Assert.Equal(0, budget.HeldBytes);
    }

    [Fact]
    public void A_lease_for_arriving_bytes_counts_them_in_steps_as_they_arrive_and_its_whole_mapping_once_all_are_in()
    {
        var budget = new LeaseBudget(1L << 30);
        SharedBuffer lease = budget.RentArriving((40 << 20) + 5, out ArrivalCharge charge); // a mapping of 40 MiB + a page
        Assert.Equal(0, budget.HeldBytes); // the size named costs nothing of itself
        charge.Cover(1);
        Assert.Equal(ArrivalCharge.Step, budget.HeldBytes);
        charge.Cover(ArrivalCharge.Step); // within the step counted
        Assert.Equal(ArrivalCharge.Step, budget.HeldBytes);
        charge.Cover(ArrivalCharge.Step + 1);
        Assert.Equal(2 * ArrivalCharge.Step, budget.HeldBytes);
        charge.Cover(ArrivalCharge.Step); // never less than counted
        Assert.Equal(2 * ArrivalCharge.Step, budget.HeldBytes);
        charge.Cover((40 << 20) + 5); // all of it: the whole mapping, as a lease rented whole
        Assert.Equal((40L << 20) + 4096, budget.HeldBytes);
        Assert.Equal(budget.HeldBytes, charge.Counted);
        lease.Dispose();
        lease.Dispose();
        Assert.Equal(0, budget.HeldBytes);

        using SharedBuffer small = budget.RentArriving(5000, out ArrivalCharge smallCharge);
        smallCharge.Cover(1);
        Assert.Equal(8192, budget.HeldBytes); // a step never counts more than the mapping
    }

    [Fact]
    public void A_step_past_the_limit_is_refused_taking_nothing_and_the_lease_gives_back_what_it_counted()
    {
        var budget = new LeaseBudget(4L << 20);
        SharedBuffer large = budget.RentArriving(int.MaxValue, out ArrivalCharge charge); // 2 GiB named, in a budget of 4 MiB
        charge.Cover(4L << 20);
        Assert.Equal(4L << 20, budget.HeldBytes);
        ArenaExhaustedException refused = Assert.Throws<ArenaExhaustedException>(() => charge.Cover((4L << 20) + 1));
        Assert.Contains("MaxBufferedRequestBytes", refused.Message, StringComparison.Ordinal);
        Assert.Contains("counted as its bytes arrive", refused.Message, StringComparison.Ordinal);
        Assert.Equal(4L << 20, budget.HeldBytes);
        Assert.Equal(4L << 20, charge.Counted);
        large.Dispose();
        Assert.Equal(0, budget.HeldBytes);
    }
}
